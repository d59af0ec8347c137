"""OpenVINO behind the Predictor: the checkpoint's network converted once to OpenVINO IR, cached
beside the checkpoint, and compiled in each process for its own CPU threads, in f32.

The cache is ``<checkpoint>.openvino/<sha256>-<OpenVINO version>.{xml,bin,json}``: the checkpoint's
sha256 and the runtime's version name it, so a checkpoint replaced at the same path, or another
OpenVINO, never finds an IR that is not its own.  The ``.json`` record is written last: an IR
without it is incomplete and rebuilt, as is one that does not read back.  Where the folder cannot be
written (a read-only image), the converted model is used from memory, with a log line.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from model.export_onnx import LogitsOnly
from utils.errors import UserError
from utils.fileio import file_sha256, write_text

log = logging.getLogger(__name__)

# The sample the converter traces with: odd at every pooling level, height and width apart, as
# for the ONNX export (model/export_onnx.py); the IR's height and width stay free.
TRACE_SIZE = (63, 95)
# What our converted graph returns: logits pixel-major (N x H x W x C), the layout whose per-pixel
# softmax and max read memory in order.  Part of the cache name: an IR of another layout is not ours.
OUTPUT_LAYOUT = "nhwc"
# A photo service sees few network sizes: the checkpoint fixes the long side, the aspect ratio the other.
STATIC_SIZES_KEPT = 8


class OpenVINOMissing(UserError, ImportError):
    """OpenVINO is not installed."""


def openvino():
    try:
        import openvino as ov
    except ImportError as error:
        raise OpenVINOMissing("the openvino backend needs OpenVINO: pip install -r requirements.txt") from error
    return ov


def cache_paths(checkpoint: Path, sha256: str, version: str) -> dict[str, Path]:
    folder = checkpoint.with_name(checkpoint.name + ".openvino")
    stem = f"{sha256}-{version.split('-')[0]}-{OUTPUT_LAYOUT}"
    return {suffix: folder / f"{stem}.{suffix}" for suffix in ("xml", "bin", "json")}


class PixelMajorLogits(LogitsOnly):
    """The main logits as N x H x W x C: the transposition happens inside the runtime's graph."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).permute(0, 2, 3, 1)


def convert(model: nn.Module):
    """The ov.Model of ``model``'s main logits, N x H x W x C, for 1 x 3 x H x W float32 input, H and W free."""
    ov = openvino()
    wrapped = PixelMajorLogits(model).cpu().float().eval()
    # The tracer warns at each Python branch on a shape; TRACE_SIZE takes the branches that are
    # right at every size (the U-Net's pads, computed from the shape, are 0 where none is needed).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # OpenVINO's converter traces with torch.jit.trace
        return ov.convert_model(wrapped, example_input=torch.zeros(1, 3, *TRACE_SIZE),
                                input=[ov.PartialShape([1, 3, -1, -1])])


def read_cached(paths: dict[str, Path], sha256: str):
    """The cached ov.Model, or None when the cache is absent, incomplete, another's, or unreadable."""
    if not paths["json"].exists():
        return None
    try:
        record = json.loads(paths["json"].read_text())
        if record.get("checkpoint_sha256") != sha256:
            raise ValueError("it names another checkpoint")
        return openvino().Core().read_model(str(paths["xml"]), str(paths["bin"]))
    except Exception as error:  # OpenVINO raises RuntimeError subclasses of its own for broken IR
        log.warning("rebuilding the OpenVINO cache %s: %s", paths["xml"].name, str(error).splitlines()[0])
        return None


def write_cache(ov_model, paths: dict[str, Path], sha256: str) -> None:
    """Save the IR next to the checkpoint: xml and bin first, under temporary names, then the
    record that marks them complete; other caches of this checkpoint path go."""
    ov = openvino()
    folder = paths["xml"].parent
    folder.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        # f32 as converted: save_model would otherwise compress the weights to f16.
        ov.save_model(ov_model, str(staging / "model.xml"), compress_to_fp16=False)
        os.replace(staging / "model.bin", paths["bin"])
        os.replace(staging / "model.xml", paths["xml"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_text(paths["json"], json.dumps({"checkpoint_sha256": sha256, "openvino": ov.get_version()}))
    for stale in folder.iterdir():
        if not stale.name.startswith(paths["xml"].stem) and not stale.name.startswith("."):
            stale.unlink(missing_ok=True)


def ir_for(checkpoint: str | os.PathLike, model: nn.Module):
    """The ov.Model of ``checkpoint`` (whose network ``model`` is): from the cache, else converted
    and, where the folder can be written, cached."""
    checkpoint = Path(checkpoint)
    sha256 = file_sha256(checkpoint)
    paths = cache_paths(checkpoint, sha256, openvino().get_version())
    cached = read_cached(paths, sha256)
    if cached is not None:
        return cached
    log.info("converting %s to OpenVINO IR (once per checkpoint and OpenVINO version)", checkpoint.name)
    converted = convert(model)
    try:
        write_cache(converted, paths, sha256)
    except OSError as error:
        log.warning("the OpenVINO IR is not cached (%s): it is converted again at each start", error)
    return converted


def openvino_forward(checkpoint: str | os.PathLike, model: nn.Module,
                     threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """1 x 3 x h x w input -> 1 x C x h x w logits through OpenVINO on the CPU, in f32 (said
    explicitly: on CPUs with AMX, OpenVINO would otherwise choose bf16), on ``threads`` threads
    (default: torch's count in this process, set after gunicorn's fork).

    Each input size runs a graph compiled for exactly that size: on the default model at 640x480
    it is 1.3x faster than the dynamic-shape graph, at the same class maps (no padding to a
    bucket), and compiles in 0.2 s.  The STATIC_SIZES_KEPT most recent sizes stay compiled.
    """
    ov = openvino()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    core, ir = ov.Core(), ir_for(checkpoint, model)
    requests: OrderedDict[tuple[int, int], object] = OrderedDict()

    def request_for(height: int, width: int):
        if (height, width) in requests:
            requests.move_to_end((height, width))
            return requests[(height, width)]
        static = ir.clone()
        static.reshape([1, 3, height, width])
        requests[(height, width)] = core.compile_model(static, "CPU", config).create_infer_request()
        if len(requests) > STATIC_SIZES_KEPT:
            requests.popitem(last=False)
        return requests[(height, width)]

    def forward(batch: torch.Tensor) -> torch.Tensor:
        request = request_for(*batch.shape[-2:])
        request.infer([batch.float().contiguous().cpu().numpy()])
        # A copy: the request reuses its output buffer.  Viewed as N x C x H x W in channels_last
        # memory, as the torch path's logits are.
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).permute(0, 3, 1, 2)
    return forward
