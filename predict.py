"""Segment an image, a folder of images, a video file or a camera with a trained checkpoint.

    python predict.py --checkpoint save/best.pth --input photo.jpg --out out [--raw]
        -> out/photo_overlay.jpg, and with --raw out/photo_classes.png (class ids, lossless)
    python predict.py --checkpoint save/best.pth --input photos/ --out out [--raw]
        -> the same for every image in the folder (read by content; other files are skipped and counted)
    python predict.py --checkpoint save/best.pth --input clip.mp4 --out out [--raw]
        -> out/clip_overlay.mp4 (same size, frame count and FPS, the measured FPS drawn on each frame),
           and with --raw out/clip_classes/000000.png, 000001.png, ...
    python predict.py --checkpoint save/best.pth --input 0 --out out --max-frames 100
        -> camera 0 into out/camera0_overlay.mp4 (300 frames unless --max-frames says otherwise)
    python predict.py --checkpoint save/best.pth --input big.jpg --out out --mode slide [--scale 0.5] [--tta flip]
        -> tiles of the training size over the photo at its own resolution (or half of it), flip-averaged
"""
from __future__ import annotations

import argparse
import sys

from utils.cli import positive_int, setup_logging, user_errors_exit
from utils.inference.predict import MediaError, predict_media
from utils.inference.predictor import BACKENDS
from utils.inference.tiling import add_strategy_arguments


def unit_fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pth written by train.py")
    parser.add_argument("--input", required=True,
                        help="an image, a folder of images, a video file or a camera index such as 0")
    parser.add_argument("--out", required=True, help="folder for the outputs")
    parser.add_argument("--raw", action="store_true", help="also write class ids as lossless PNGs")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="what runs the network: torch, onnxruntime or openvino (CPU, fp32; default: torch)")
    parser.add_argument("--alpha", type=unit_fraction, default=0.5, help="opacity of the class colours")
    parser.add_argument("--max-frames", type=positive_int, default=None,
                        help="stop a video or camera after this many frames (camera default: 300)")
    add_strategy_arguments(parser)
    return parser.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup_logging(args.out, "predict.log")
        predict_media(args)
    except OSError as error:  # an output folder that cannot be written, an input that vanished while read
        raise MediaError(str(error)) from error
    return 0


if __name__ == "__main__":
    sys.exit(main())
