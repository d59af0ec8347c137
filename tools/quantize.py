"""Quantize a checkpoint to INT8 for OpenVINO and judge it, recording the verdict beside it.

    python tools/quantize.py --checkpoint save/default/model.pth --data-dir data/default \\
        --mask-dir data/default/masks --train-split train --val-split val

Calibrates NNCF's post-training quantization on the first --calibration-images training images,
writes ``<checkpoint>.int8.{xml,bin}``, and compares it with OpenVINO fp32 on the validation
images, which calibration never saw: argmax agreement over all pixels and on the worst image,
both mIoUs, the class whose IoU changed most and whether the changed pixels were near-ties.  The
``openvino/int8`` verdict goes to ``<checkpoint>.guard.json``; the service's "auto" precision
runs INT8 only when it passed (and removes nothing else: a failed IR is deleted, its figures kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.cli import positive_int, user_errors_exit  # noqa: E402
from utils.data.datasets import add_dataset_arguments, build_dataset  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.inference.openvino_runtime import GUARD_DEVICE, int8_xml  # noqa: E402
from utils.inference.precision_guard import describe, guard_path, verdict_key  # noqa: E402
from utils.inference.quantize import DEFAULT_RECIPE, quantize_checkpoint  # noqa: E402


class QuantizeError(UserError):
    """The quantization cannot be made as asked."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pth written by train.py")
    add_dataset_arguments(parser)
    parser.add_argument("--calibration-images", type=positive_int, default=DEFAULT_RECIPE.calibration_images,
                        help="training images NNCF calibrates on (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None, help="judge on the first N validation images only")
    parser.add_argument("--threads", type=positive_int, default=None, help="OpenVINO threads (default: all cores)")
    parser.add_argument("--keep-refused", action="store_true",
                        help="keep an IR that fails the guard, for bench/backends.py (it is never served)")
    return parser.parse_args(argv)


def first(dataset, count: int | None):  # -> iterator of (image, mask)
    return (dataset.load(index) for index in range(len(dataset) if count is None else min(count, len(dataset))))


def run(args: argparse.Namespace, class_names: list[str]) -> dict:
    train, val = build_dataset(args, "train"), build_dataset(args, "val")
    if val.num_classes != len(class_names):
        raise QuantizeError(f"the checkpoint has {len(class_names)} classes but the dataset {val.num_classes}")
    calibration = (image for image, _ in first(train, args.calibration_images))
    recipe = dataclasses.replace(DEFAULT_RECIPE, calibration_images=args.calibration_images)
    return quantize_checkpoint(args.checkpoint, calibration, first(val, args.limit), recipe, args.threads,
                               args.keep_refused)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    class_names = load_checkpoint(args.checkpoint)["meta"]["class_names"]
    verdict = run(args, class_names)
    print(describe(verdict, verdict_key(GUARD_DEVICE, "int8"), "int8", class_names))
    kept = f"{int8_xml(args.checkpoint)} and its .bin" if int8_xml(args.checkpoint).exists() else \
        "no INT8 IR (removed)"
    print(f"written: {guard_path(args.checkpoint)}; {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
