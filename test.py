"""Evaluate a checkpoint on the validation split at full resolution.

    python test.py --checkpoint save/best.pth [--data-dir data/coco --mask-dir data/coco/masks]
    torchrun --nproc_per_node=N test.py --checkpoint ...   # split the images across processes

Writes save/log_test.log (pixel accuracy, mIoU, per-class IoU table), save/metrics.json,
save/vision_confusion_matrix.jpg and save/class_iou.png.  The checkpoint alone says which
model to build and how to normalise its input.
"""
from __future__ import annotations

import argparse
import sys

import config
from utils.cli import setup_logging, user_errors_exit
from utils.data.datasets import add_dataset_arguments
from utils.evaluation.test import evaluate_checkpoint
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
    return parser.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.save_dir, "test.log")
    evaluate_checkpoint(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
