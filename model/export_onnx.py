"""ONNX export with dynamic height and width, its check against PyTorch, and an ONNX Runtime session.

onnx, onnxscript and onnxruntime are optional (requirements-dev.txt): they are imported only
when exporting or running a session, so the service never needs them.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from model import main_logits

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# The U-Net pads an upsampled map only when a pooled size was odd (model.unet_parts.pad_to_match).
# Tracing at a size that is odd at every pooling level records that pad with amounts computed
# from the input's shape; the amounts are 0 for other sizes, so the one graph is exact for all.
# Height and width differ so that the exporter does not assume square inputs, and the batch is 2
# because the exporter fixes any dimension traced at size 1.
TRACE_SHAPE = (2, 3, 31, 47)
CHECK_SIZES = ((31, 47), (37, 53), (64, 48), (101, 97), (16, 16))


class NotExportable(ValueError):
    """A model that torch.onnx cannot express; the message names the part."""


def check_exportable(model: nn.Module) -> None:
    if any(isinstance(module, nn.MaxUnpool2d) for module in model.modules()):
        # onnxscript's torchlib, which torch.onnx's exporter uses, leaves aten.max_unpool2d unimplemented.
        raise NotExportable("SegNet's max unpooling (nn.MaxUnpool2d) has no ONNX export in torch.onnx; "
                            "serve this model with PyTorch")


class LogitsOnly(nn.Module):
    """The model's main logits, without torchvision's dict or auxiliary head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return main_logits(self.model(images))


def require(module: str) -> None:
    """Import ``module`` or raise an ImportError that says how to install it."""
    try:
        __import__(module)
    except ImportError as error:
        raise ImportError(f"{module} is not installed: pip install -r requirements-dev.txt") from error


def export_onnx(model: nn.Module) -> bytes:
    """The serialised ONNX model of ``model`` (eval mode, fp32, on the CPU): input ``images``
    N x 3 x H x W, output ``logits`` N x C x H x W, with N, H and W free."""
    check_exportable(model)
    for module in ("onnx", "onnxscript"):
        require(module)
    wrapped = LogitsOnly(model).cpu().float().eval()
    sample = torch.zeros(TRACE_SHAPE)
    free = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=16), 3: torch.export.Dim("width", min=16)}
    # The exporter prints progress and warns about its own internals; neither helps the caller.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, (sample,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={INPUT_NAME: free}, dynamo=True, optimize=True)
    return program.model_proto.SerializeToString()


def onnxruntime_session(model: bytes | str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session for a serialised model or a .onnx file."""
    require("onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else os.fspath(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(session, images: torch.Tensor) -> torch.Tensor:
    """N x C x H x W logits of ``images`` (N x 3 x H x W float32)."""
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.float().contiguous().cpu().numpy()})
    return torch.from_numpy(logits)


@torch.inference_mode()
def largest_difference(model: nn.Module, session, sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
                       seed: int = 0) -> float:
    """The largest absolute logit difference between ``model`` and the session over ``sizes``."""
    generator = torch.Generator().manual_seed(seed)
    wrapped = LogitsOnly(model).cpu().float().eval()
    worst = 0.0
    for height, width in sizes:
        images = torch.randn(1, 3, height, width, generator=generator)
        expected = wrapped(images)
        worst = max(worst, float(np.abs(run_session(session, images).numpy() - expected.numpy()).max()))
    return worst
