"""OpenVINO behind the Predictor: the checkpoint's network converted once to OpenVINO IR, cached
beside the checkpoint, and compiled in each process for its own CPU threads, in f32.

The cache is ``<checkpoint>.openvino/<sha256>-<OpenVINO version>-nhwc.{xml,bin,json}``: the
checkpoint's sha256, the runtime's full version and the output layout name it, so a checkpoint
replaced at the same path, or another OpenVINO, never finds an IR that is not its own.  The
``.json`` record holds the sha256 of the xml and bin beside it and is written last: an IR that
does not match its record (half written, two workers writing at once, a flipped bit) is rebuilt
with a log line, never served.  Where the folder cannot be written (a read-only image), the
converted model is used from memory, with a log line.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from model.export_onnx import LogitsOnly, trace_size
from utils.errors import UserError
from utils.fileio import file_sha256, write_text

log = logging.getLogger(__name__)

# What our converted graph returns: logits pixel-major (N x H x W x C), the layout whose per-pixel
# softmax and max read memory in order.  Part of the cache name: an IR of another layout is not ours.
OUTPUT_LAYOUT = "nhwc"
# A graph compiled for one exact size is 1.3x faster than the dynamic one (default model, 640x480)
# and compiles in 0.2 s; a size gets its own once it comes back, and the most recent few are kept
# (each holds its own packed weights: 27 MB for the default model).
STATIC_SIZES_KEPT = 4
STAGING_MAX_AGE_S = 600  # a staging folder this old belongs to a writer that died


class OpenVINOMissing(UserError, ImportError):
    """OpenVINO is not installed."""


def openvino():  # -> the openvino module
    try:
        import openvino as ov
    except ImportError as error:
        raise OpenVINOMissing("the openvino backend needs OpenVINO: pip install -r requirements.txt") from error
    return ov


def cache_paths(checkpoint: Path, sha256: str, version: str) -> dict[str, Path]:
    folder = checkpoint.with_name(checkpoint.name + ".openvino")
    stem = f"{sha256}-{re.sub(r'[^0-9A-Za-z.]+', '_', version)}-{OUTPUT_LAYOUT}"
    return {suffix: folder / f"{stem}.{suffix}" for suffix in ("xml", "bin", "json")}


class PixelMajorLogits(LogitsOnly):
    """The main logits as N x H x W x C: the transposition happens inside the runtime's graph."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).permute(0, 2, 3, 1)


def convert(model: nn.Module):  # -> openvino.Model
    """The ov.Model of ``model``'s main logits, N x H x W x C, for 1 x 3 x H x W float32 input, H and W free."""
    ov = openvino()
    wrapped = PixelMajorLogits(model).cpu().float().eval()
    # The tracer warns at each Python branch on a shape; the ONNX export's trace size takes the
    # branches that are right at every size (the U-Net's pads, computed from the shape, are 0
    # where none is needed).  The IR's height and width stay free.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # OpenVINO's converter traces with torch.jit.trace
        return ov.convert_model(wrapped, example_input=torch.zeros(1, 3, *trace_size(model)),
                                input=[ov.PartialShape([1, 3, -1, -1])])


def read_cached(paths: dict[str, Path], sha256: str):  # -> openvino.Model | None
    """The cached ov.Model, or None when the cache is absent, another's, or not what its record says."""
    if not paths["json"].exists():
        return None
    try:
        record = json.loads(paths["json"].read_text())
        if record.get("checkpoint_sha256") != sha256:
            raise ValueError("it names another checkpoint")
        for suffix in ("xml", "bin"):
            if file_sha256(paths[suffix]) != record.get(f"{suffix}_sha256"):
                raise ValueError(f"its .{suffix} is not the one its record names")
        return openvino().Core().read_model(str(paths["xml"]), str(paths["bin"]))
    except Exception as error:  # OpenVINO raises RuntimeError subclasses of its own for broken IR
        log.warning("rebuilding the OpenVINO cache %s: %s", paths["xml"].name, str(error).splitlines()[0])
        return None


def write_cache(ov_model, paths: dict[str, Path], sha256: str) -> None:
    """Save the IR next to the checkpoint: xml and bin first, under temporary names, then the
    record naming their sha256; files of other checkpoints and dead writers' staging go."""
    ov = openvino()
    folder = paths["xml"].parent
    folder.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        # f32 as converted: save_model would otherwise compress the weights to f16.
        ov.save_model(ov_model, str(staging / "model.xml"), compress_to_fp16=False)
        record = {"checkpoint_sha256": sha256, "openvino": ov.get_version(),
                  "xml_sha256": file_sha256(staging / "model.xml"), "bin_sha256": file_sha256(staging / "model.bin")}
        os.replace(staging / "model.bin", paths["bin"])
        os.replace(staging / "model.xml", paths["xml"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_text(paths["json"], json.dumps(record))
    remove_others(folder, paths["xml"].stem)


def remove_others(folder: Path, stem: str) -> None:
    """Other checkpoints' IR files, and staging folders whose writer died, leave the cache folder."""
    for entry in folder.iterdir():
        if entry.is_dir():
            if entry.name.startswith(".staging-") and time.time() - entry.stat().st_mtime > STAGING_MAX_AGE_S:
                shutil.rmtree(entry, ignore_errors=True)
        elif not entry.name.startswith((stem, ".")):
            entry.unlink(missing_ok=True)


def ir_for(checkpoint: str | os.PathLike, model: nn.Module):  # -> openvino.Model
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
    except (OSError, RuntimeError) as error:  # RuntimeError: OpenVINO's word for a failed save
        log.warning("the OpenVINO IR is not cached (%s): it is converted again at each start",
                    str(error).splitlines()[0])
    return converted


def openvino_forward(checkpoint: str | os.PathLike, model: nn.Module,
                     threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """1 x 3 x h x w input -> 1 x C x h x w logits through OpenVINO on the CPU, in f32 (said
    explicitly: on CPUs with AMX, OpenVINO would otherwise choose bf16), on ``threads`` threads
    (default: torch's count in this process, set after gunicorn's fork).  A size runs on the
    dynamic-shape graph until it comes back, then on a graph compiled for it (STATIC_SIZES_KEPT)."""
    ov = openvino()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    core, ir = ov.Core(), ir_for(checkpoint, model)
    dynamic = core.compile_model(ir, "CPU", config).create_infer_request()
    static: OrderedDict[tuple[int, int], object] = OrderedDict()
    seen: Counter[tuple[int, int]] = Counter()
    lock = threading.Lock()  # an infer request runs one input at a time and reuses its output buffer

    def request_for(size: tuple[int, int]):  # -> openvino.InferRequest
        if size in static:
            static.move_to_end(size)
            return static[size]
        seen[size] += 1
        if seen[size] < 2:
            return dynamic
        fixed = ir.clone()
        fixed.reshape([1, 3, *size])
        static[size] = core.compile_model(fixed, "CPU", config).create_infer_request()
        if len(static) > STATIC_SIZES_KEPT:
            static.popitem(last=False)
        return static[size]

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with lock:
            request = request_for(tuple(batch.shape[-2:]))
            request.infer([batch.float().contiguous().cpu().numpy()])
            logits = request.get_output_tensor(0).data.copy()
        # Viewed as N x C x H x W in channels_last memory, as the torch path's logits are.
        return torch.from_numpy(logits).permute(0, 3, 1, 2)
    return forward
