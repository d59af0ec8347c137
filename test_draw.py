"""Draw predictions, or time inference, for a checkpoint.

    python test_draw.py draw --checkpoint save/best.pth [--count 20]
        -> save/draw/{train,val}_<image>.jpg: image | ground truth | prediction, with a legend
    python test_draw.py compute_time --checkpoint save/best.pth [--count 100 --warmup 5]
        -> mean/median latency and images/s, printed and written to save/compute_time.txt
"""
from __future__ import annotations

import argparse
import sys

import config
from utils.cli import positive_int, setup_logging, user_errors_exit
from utils.data.datasets import add_dataset_arguments
from utils.inference.predictor import BACKENDS
from utils.inference.test_draw import compute_time, draw
from utils.inference.tiling import add_strategy_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("draw", "compute_time"))
    parser.add_argument("--checkpoint", required=True, help="a .pth written by train.py")
    add_dataset_arguments(parser)
    config.add_arguments(parser, "save_dir")
    parser.add_argument("--count", type=int, default=None,
                        help="images per split to draw (default 20) or to time (default 100)")
    parser.add_argument("--warmup", type=int, default=5, help="compute_time: untimed runs first")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="what runs the network: torch, onnxruntime or openvino (CPU, fp32; default: torch)")
    add_strategy_arguments(parser)
    args = parser.parse_args(argv)
    if args.count is None:
        args.count = 20 if args.command == "draw" else 100
    return args


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.save_dir, "test_draw.log")
    (draw if args.command == "draw" else compute_time)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
