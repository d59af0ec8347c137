"""Measure whether a checkpoint may be served in a reduced precision, and record the verdict beside it.

    python tools/guard_precision.py --checkpoint save/default/model.pth --data-dir data/default \\
        --mask-dir data/default/masks --val-split val                 # cpu/bf16
    python tools/guard_precision.py ... --device cuda --dtype fp16     # cuda/fp16, on a GPU
    python tools/guard_precision.py ... --backend openvino             # openvino/bf16

Runs the predictor in fp32 and in the reduced dtype on the device over the validation images
(each as the service sees it), prints the pixel agreement of the two class maps and both mIoUs,
and records the verdict for that device and dtype in ``<checkpoint>.guard.json``.  With
``--backend openvino`` both runs are OpenVINO's (fp32 and its bf16 hint) and the verdict is
``openvino/bf16``.  The service's "auto" precision uses bf16 on the CPU (torch or OpenVINO),
fp16 on CUDA, only when the verdict for exactly that belongs to the checkpoint and passes the
rule every reduced precision is held to (agreement >= 99% over all pixels and >= 97% on the
worst image, mIoU drop <= 0.5 points).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import positive_int, user_errors_exit  # noqa: E402
from utils.data.datasets import add_dataset_arguments, build_dataset  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.inference.openvino_runtime import GUARD_DEVICE as OPENVINO  # noqa: E402
from utils.inference.precision_guard import (  # noqa: E402
    compare_precisions,
    describe,
    guard_path,
    verdict_key,
    write_guard,
)
from utils.inference.predictor import Predictor  # noqa: E402


class GuardError(UserError):
    """The comparison cannot be made as asked."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pth written by train.py")
    add_dataset_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="compare on the first N images only")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the verdict holds")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                        help="the reduced precision to judge (bf16 on the CPU; fp16, what CUDA serves, or bf16)")
    parser.add_argument("--backend", choices=("torch", OPENVINO), default="torch",
                        help="the runtime whose reduced precision is judged (openvino: its bf16, on the CPU)")
    return parser.parse_args(argv)


def verdict_device(args: argparse.Namespace) -> str:
    """Where the verdict holds: the device for torch, "openvino" for OpenVINO's precisions."""
    return OPENVINO if args.backend == OPENVINO else args.device


def load_pair(args: argparse.Namespace) -> tuple[Predictor, Predictor]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GuardError("--device cuda: no CUDA device on this machine")
    if (args.device, args.dtype) == ("cpu", "fp16"):
        raise GuardError("fp16 is served on CUDA only: judge the CPU with --dtype bf16")
    if args.backend == OPENVINO and (args.device, args.dtype) != ("cpu", "bf16"):
        raise GuardError("--backend openvino judges bf16 on the CPU (tools/quantize.py judges int8)")
    fp32, reduced = (Predictor.from_checkpoint(args.checkpoint, device=args.device, threads=args.threads,
                                               precision=precision, backend=args.backend)
                     for precision in ("fp32", args.dtype))
    if reduced.precision != args.dtype:
        raise GuardError("this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 is never served here")
    return fp32, reduced


def run(args: argparse.Namespace) -> tuple[Predictor, dict]:
    fp32, reduced = load_pair(args)
    dataset = build_dataset(args, "val")
    if dataset.num_classes != fp32.num_classes:
        raise GuardError(f"the checkpoint has {fp32.num_classes} classes but the dataset {dataset.num_classes}")
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    samples = (dataset.load(index) for index in range(count))
    figures = compare_precisions(fp32.class_map_and_margin, lambda image: reduced.predict(image).class_map,
                                 samples, fp32.num_classes, args.dtype)
    return fp32, write_guard(args.checkpoint, figures, verdict_device(args), args.dtype)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fp32, record = run(args)
    print(describe(record, verdict_key(verdict_device(args), args.dtype), args.dtype, fp32.class_names))
    print(f"(written to {guard_path(args.checkpoint)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
