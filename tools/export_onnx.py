"""Export a checkpoint to ONNX (any height and width), checked against PyTorch on odd sizes.

    python tools/export_onnx.py --checkpoint save/default/model.pth [--out save/default/model.onnx]

The file names the checkpoint's sha256: at the default --out, the onnxruntime backend serves it for
this checkpoint rather than export at every start.

Input ``images`` (N x 3 x H x W, normalised as the checkpoint's meta says), output ``logits``
(N x C x H x W).  Needs onnx, onnxscript and onnxruntime (pip install -r requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import load_model  # noqa: E402
from model.export_onnx import (  # noqa: E402
    check_sizes,
    export_onnx,
    largest_difference,
    onnxruntime_session,
)
from utils.cli import user_errors_exit  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.fileio import atomic_path, file_sha256  # noqa: E402
from utils.inference.onnx_runtime import exported_file  # noqa: E402

TOLERANCE = 1e-3  # largest absolute logit difference accepted between ONNX Runtime and PyTorch


class ExportError(UserError):
    """The exported model does not reproduce PyTorch's logits."""


def export_checkpoint(checkpoint: str, out: Path) -> tuple[float, list[tuple[int, int]]]:
    """Write ``out``; return the largest logit difference to PyTorch and the sizes it was checked at."""
    model, _ = load_model(checkpoint, torch.device("cpu"))
    serialised = export_onnx(model, file_sha256(checkpoint))
    difference = largest_difference(model, onnxruntime_session(serialised))
    if difference > TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {difference:.2e} (> {TOLERANCE}); nothing written")
    with atomic_path(out) as tmp:
        tmp.write_bytes(serialised)
    return difference, check_sizes(model)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, help="default: the checkpoint's path with .onnx")
    args = parser.parse_args(argv)
    out = args.out or exported_file(args.checkpoint)
    difference, checked = export_checkpoint(args.checkpoint, out)
    sizes = ", ".join(f"{w}x{h}" for h, w in checked)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); largest logit difference to PyTorch "
          f"over {sizes}: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
