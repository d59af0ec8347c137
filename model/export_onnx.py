"""ONNX export with dynamic height and width, its check against PyTorch, and an ONNX Runtime session.

onnx, onnxscript and onnxruntime are optional (requirements-dev.txt): they are imported only
when exporting or running a session, so the service never needs them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model import main_logits, min_input_size
from utils.errors import UserError

INPUT_NAME, OUTPUT_NAME = "images", "logits"
CHECKPOINT_KEY = "checkpoint_sha256"  # the ONNX file's metadata: the checkpoint it was exported from
# The U-Net pads an upsampled map only when a pooled size was odd (model.unet_parts.pad_to_match).
# Tracing at a size that is odd at every pooling level records that pad with amounts computed
# from the input's shape; the amounts are 0 for other sizes, so the one graph is exact for all.
# Height and width differ so that the exporter does not assume square inputs, and the batch is 2
# because the exporter fixes any dimension traced at size 1.  Models that need larger inputs
# (a ``min_input_size`` of 32: SegNet, the reflect-padded U-Net) get these sizes scaled up.
TRACE_SIZE = (31, 47)
CHECK_SIZES = ((31, 47), (37, 53), (64, 48), (101, 97), (16, 16))
SMALLEST_SIZE = 16


def size_scale(model: nn.Module) -> int:
    """By how much the trace and check sizes grow so that ``model`` accepts every one of them."""
    return -(-max(min_input_size(model), SMALLEST_SIZE) // SMALLEST_SIZE)


def trace_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) a trace of ``model`` runs at: TRACE_SIZE scaled so that it stays odd at
    every pooling level ((31, 47) scaled by 2 is (63, 95): (size + 1) * scale - 1)."""
    scale = size_scale(model)
    return tuple((size + 1) * scale - 1 for size in TRACE_SIZE)


def check_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """The (height, width) sizes an export of ``model`` is checked at."""
    scale = size_scale(model)
    return [(height * scale, width * scale) for height, width in CHECK_SIZES]


class NotExportable(UserError):
    """A model that torch.onnx cannot express; the message names the part."""


class LogitsOnly(nn.Module):
    """The model's main logits, without torchvision's dict or auxiliary head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return main_logits(self.model(images))


class MissingPackage(UserError, ImportError):
    """A package that exporting needs is not installed."""


def require(module: str) -> None:
    """Import ``module`` or raise a MissingPackage that says how to install it."""
    try:
        __import__(module)
    except ImportError as error:
        raise MissingPackage(f"{module} is not installed: pip install -r requirements-dev.txt") from error


def export_onnx(model: nn.Module, checkpoint_sha256: str | None = None) -> bytes:
    """The serialised ONNX model of ``model`` (eval mode, fp32, on the CPU): input ``images``
    N x 3 x H x W, output ``logits`` N x C x H x W, with N, H and W free (H, W >= the smallest
    check size).  ``checkpoint_sha256``, when given, is recorded in its metadata (CHECKPOINT_KEY)."""
    for module in ("onnx", "onnxscript"):
        require(module)
    wrapped = LogitsOnly(exportable_copy(model))
    sample = torch.zeros(2, 3, *trace_size(model))
    smallest = SMALLEST_SIZE * size_scale(model)
    free = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=smallest),
            3: torch.export.Dim("width", min=smallest)}
    # The exporter prints progress, warns about its own internals and dumps graphs when it fails;
    # none of it helps the caller, who gets the root cause in one line.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(wrapped, (sample,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={INPUT_NAME: free}, dynamo=True, optimize=True)
        except torch.onnx.OnnxExporterError as error:  # it wraps the error that matters
            raise NotExportable(f"torch.onnx could not export {type(model).__name__}: {root_cause(error)}") from error
    if checkpoint_sha256:
        program.model.metadata_props[CHECKPOINT_KEY] = checkpoint_sha256
    return program.model_proto.SerializeToString()


def exportable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode, fp32, on the CPU) that exports faster to the same logits; the
    caller's model stays as it is.  Its in-place modules (``inplace=True``: ReLU, ReLU6, Dropout...)
    run out of place: torch.export functionalises each in-place op through its reference
    decomposition, whose symbolic stride arithmetic cost 13 s of the default model's 33 s export
    (MobileNetV2's ReLU6s, AVX2 EPYC).  Each batch norm right after a convolution in a plain
    Sequential is folded into that convolution (fold_batch_norms says which are kept): the exporter
    decomposes every batch norm with symbolic shapes, and folding them took the default model's
    export from 8.7-9.2 to 6.2 s (AMD EPYC avx512_bf16); ONNX Runtime folds them when it loads the
    graph anyway."""
    exported = copy.deepcopy(model).cpu().float().eval()
    for module in exported.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
        if type(module).forward is nn.Sequential.forward:  # a plain chain: each output feeds the next
            fold_batch_norms(module)
    return exported


def fold_batch_norms(chain: nn.Sequential) -> None:
    """Each eval-mode BatchNorm2d that follows a Conv2d in ``chain`` folded into it (an Identity left
    in its place, so that the chain's indices and names stay), unless either has hooks: they would
    see the folded values, or be lost with the batch norm."""
    for index in range(len(chain) - 1):
        conv, norm = chain[index], chain[index + 1]
        if (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.running_mean is not None
                and not (has_hooks(conv) or has_hooks(norm))):
            chain[index], chain[index + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def root_cause(error: BaseException) -> str:
    """The first line of the innermost exception ``error`` was raised from."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
def largest_difference(model: nn.Module, session, sizes: Sequence[tuple[int, int]] | None = None,
                       seed: int = 0) -> float:
    """The largest absolute logit difference between ``model`` and the session over ``sizes``
    (default: the model's check sizes)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = sizes or check_sizes(model)
    wrapped = LogitsOnly(model).cpu().float().eval()
    worst = 0.0
    for height, width in sizes:
        images = torch.randn(1, 3, height, width, generator=generator)
        expected = wrapped(images)
        worst = max(worst, float(np.abs(run_session(session, images).numpy() - expected.numpy()).max()))
    return worst
