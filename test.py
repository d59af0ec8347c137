"""Evaluate a checkpoint on the validation split at full resolution.

    python test.py --checkpoint save/best.pth [--data-dir data/coco --mask-dir data/coco/masks]
    torchrun --nproc_per_node=N test.py --checkpoint ...   # split the images across processes
    python test.py --checkpoint ... --mode slide --tta flip   # as predict.py and the service see them
    python test.py --checkpoint ... --mode whole --corruptions all --severities 1-5   # robustness report

Writes save/log_test.log (pixel accuracy, mIoU, per-class IoU table), save/metrics.json,
save/vision_confusion_matrix.jpg and save/class_iou.png (with --corruptions: save/robustness.md,
.json and robustness_*.png).  The checkpoint alone says which model to build and how to
normalise its input.
"""
from __future__ import annotations

import argparse
import sys

import config
from utils.cli import setup_logging, user_errors_exit
from utils.data.corruptions import GROUPS
from utils.data.datasets import add_dataset_arguments
from utils.evaluation.test import evaluate_checkpoint
from utils.inference.evaluate import evaluate_through_predictor, through_predictor
from utils.inference.predictor import BACKENDS
from utils.inference.tiling import MODES, add_strategy_arguments
from utils.precision import AUTOCAST_PRECISIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pth written by train.py")
    add_dataset_arguments(parser)
    config.add_arguments(parser, "save_dir", "batch_size", "workers")
    parser.add_argument("--rank-images", type=int, default=5,
                        help="draw this many best and worst images by their mIoU into <save-dir>/best_worst")
    parser.add_argument("--save-predictions", metavar="DIR", help="also write each prediction as a class-id PNG")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--precision", choices=AUTOCAST_PRECISIONS, default="fp32",
                        help="fp32 (default: the figures a model card reports), auto (fp16 on CUDA), or bf16")
    add_strategy_arguments(parser, ("full", *MODES),
                           "full: every image at its own resolution in one forward, batched, as train-time "
                           "validation does; ")
    robustness = parser.add_argument_group("robustness (through the predictor: --mode whole or slide)")
    robustness.add_argument("--corruptions", metavar="NAME[,NAME...]",
                            help=f"score the images under these corruptions too (or a group: {', '.join(GROUPS)})")
    robustness.add_argument("--severities", default="1-5", help="corruption severities, 1-5 or 1,3,5 (default 1-5)")
    robustness.add_argument("--seed", type=int, help="the corruptions' random draws (default 0)")
    robustness.add_argument("--target-class", help="the class followed besides mIoU (default: a two-class model's "
                                                   "foreground)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="through the predictor: what runs the network (default: torch)")
    return parser.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.save_dir, "test.log")
    if through_predictor(args):
        evaluate_through_predictor(args)
    else:
        evaluate_checkpoint(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
