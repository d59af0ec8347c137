"""OpenVINO behind the Predictor: the checkpoint's network converted once to OpenVINO IR, cached
beside the checkpoint, and compiled in each process for its own CPU threads, in f32 unless a
guarded reduced precision was chosen (openvino_model).

The cache is ``<checkpoint>.openvino/<sha256>-<OpenVINO version>-nchw.{xml,bin,json}``: the
checkpoint's sha256, the runtime's full version and the output layout name it, so a checkpoint
replaced at the same path, or another OpenVINO, never finds an IR that is not its own.  The
``.json`` record holds the sha256 of the xml and bin beside it and is written last: an IR that
does not match its record (half written, two workers writing at once, a flipped bit) is rebuilt
with a log line, never served.  Where the folder cannot be written (a read-only image), the
converted model is used from memory, with a log line.

The INT8 IR (tools/quantize.py) is ``<checkpoint>.int8.{xml,bin}``: made once, by a measurement
that takes minutes, and shipped beside the default model, so it is not a cache.  Its guard
verdict (``openvino/int8`` in ``<checkpoint>.guard.json``) names the checkpoint's sha256 and the
xml's and bin's: INT8 runs only when all three match and the verdict passes.
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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.export_onnx import LogitsOnly, trace_size
from utils.errors import UserError
from utils.fileio import file_sha256, write_text
from utils.inference.precision_guard import measured_here, passes, precision_allowed, read_guard
from utils.precision import cpu_kind, cpu_supports_bf16

log = logging.getLogger(__name__)

# What our converted graph returns: N x C x H x W logits, reduced over C inside the graph (a
# transposition to pixel-major N x H x W x C cost 45 ms of a 170 ms forward of the default model).
# Part of the cache name: an IR of another layout is not ours.
OUTPUT_LAYOUT = "nchw"
# A graph compiled for one exact size is 1.3x faster than the dynamic one (default model, 640x480)
# and compiles in 0.2 s; a size gets its own once it comes back, and the most recent few are kept
# (each holds its own packed weights: 27 MB for the default model).
STATIC_SIZES_KEPT = 4
STAGING_MAX_AGE_S = 600  # a staging folder this old belongs to a writer that died


GUARD_DEVICE = "openvino"  # the verdicts for OpenVINO's reduced precisions: openvino/int8, openvino/bf16
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the quantized layers are int8 by the IR


class OpenVINOMissing(UserError, ImportError):
    """OpenVINO is not installed."""


class PrecisionRefused(UserError, ValueError):
    """A reduced precision was asked for that no passing accuracy guard allows."""


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


def convert(model: nn.Module):  # -> openvino.Model
    """The ov.Model of ``model``'s main logits, N x C x H x W, for 1 x 3 x H x W float32 input, H and W free."""
    ov = openvino()
    wrapped = LogitsOnly(model).cpu().float().eval()
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


def save_ir(ov_model, xml: Path) -> dict[str, str]:
    """Write ``xml`` and its ``.bin`` through a staging folder beside them (bin, then xml, each by
    rename); returns their sha256 as ``{"xml_sha256": ..., "bin_sha256": ...}``."""
    staging = Path(tempfile.mkdtemp(dir=xml.parent, prefix=".staging-"))
    try:
        # The weights as they are: save_model would otherwise compress f32 weights to f16.
        openvino().save_model(ov_model, str(staging / "model.xml"), compress_to_fp16=False)
        digests = {f"{suffix}_sha256": file_sha256(staging / f"model.{suffix}") for suffix in ("xml", "bin")}
        os.replace(staging / "model.bin", xml.with_suffix(".bin"))
        os.replace(staging / "model.xml", xml)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return digests


def write_cache(ov_model, paths: dict[str, Path], sha256: str) -> None:
    """Save the IR next to the checkpoint, then the record naming its sha256; files of other
    checkpoints and dead writers' staging go."""
    folder = paths["xml"].parent
    folder.mkdir(exist_ok=True)
    record = {"checkpoint_sha256": sha256, "openvino": openvino().get_version(), **save_ir(ov_model, paths["xml"])}
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


def int8_xml(checkpoint: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(checkpoint)}.int8.xml")


def int8_ir(checkpoint: str | os.PathLike):  # -> openvino.Model | None
    """The INT8 IR beside ``checkpoint`` when its passing guard verdict names this checkpoint and
    these very files; else None (with a log line when files exist that cannot be trusted)."""
    xml = int8_xml(checkpoint)
    if not xml.exists():
        return None
    verdict = read_guard(checkpoint, GUARD_DEVICE, "int8")
    if verdict is None or not passes(verdict):
        return None
    if not measured_here(verdict, GUARD_DEVICE):
        log.warning("the INT8 verdict was measured on a %s CPU, this one is %s: running fp32 (run tools/quantize.py "
                    "here to judge it on this CPU)", verdict.get("cpu", "unnamed"), cpu_kind())
        return None
    for path, key in ((xml, "xml_sha256"), (xml.with_suffix(".bin"), "bin_sha256")):
        if not path.exists() or file_sha256(path) != verdict.get(key):
            log.warning("%s is not the INT8 IR its guard verdict judged: running fp32", path.name)
            return None
    try:
        quantized = openvino().Core().read_model(str(xml), str(xml.with_suffix(".bin")))
    except RuntimeError as error:
        log.warning("the INT8 IR %s does not load (%s): running fp32", xml.name, str(error).splitlines()[0])
        return None
    if quantized.output(0).get_partial_shape()[1].is_dynamic:  # N x H x W x C: quantized before OUTPUT_LAYOUT
        log.warning("the INT8 IR %s has pixel-major logits (made by an older version): running fp32; "
                    "run tools/quantize.py again", xml.name)
        return None
    return quantized


def openvino_model(checkpoint: str | os.PathLike, model: nn.Module, requested: str):  # -> (ov.Model, str)
    """The IR to run for ``requested`` (auto, fp32, bf16, int8) and its precision: "auto" takes the
    fastest whose guard verdict for OpenVINO passed (int8, then bf16 where the CPU has it
    natively), else fp32; "int8" without a passing verdict is refused."""
    if requested == "fp16":
        raise ValueError("fp16 runs on CUDA only; on the CPU use int8, bf16 or fp32")
    if requested in ("auto", "int8"):
        quantized = int8_ir(checkpoint)
        if quantized is not None:
            return quantized, "int8"
        if requested == "int8":
            raise PrecisionRefused(f"int8: {Path(checkpoint).name} has no INT8 IR with a passing guard verdict "
                                   "(tools/quantize.py makes and judges one)")
    return ir_for(checkpoint, model), bf16_or_fp32(checkpoint, requested)


def bf16_or_fp32(checkpoint: str | os.PathLike, requested: str) -> str:
    """bf16 where the CPU has it natively and it was asked for, or "auto" and its verdict passed."""
    native = cpu_supports_bf16()
    if requested == "bf16" and not native:
        log.warning("bf16 requested, but this CPU has no native bf16: running fp32")
    if native and (requested == "bf16" or requested == "auto" and precision_allowed(checkpoint, GUARD_DEVICE, "bf16")):
        return "bf16"
    return "fp32"


def with_class_and_confidence(ir):  # -> openvino.Model
    """``ir`` answering each pixel's class id and that class's softmax probability instead of the
    logits, computed inside the runtime's graph: a prediction never copies the C x H x W logits out
    (112 MB for the default model at 640x480).  The probability of the top logit m is
    1 / sum(exp(logits - m)).  Static 640x480, 2-core AVX-512 EPYC (bench/README.md): without the
    softmax over all classes the default model's forward took 92 instead of 103 ms, and the logits
    output had cost 29 ms more (163 vs 134 in another run)."""
    ov = openvino()
    from openvino import opset13 as ops

    logits = ir.get_results()[0].input_value(0)  # what the logits' Result node reads
    top = ops.topk(logits, 1, 1, "max", "none", "i32")
    total = ops.reduce_sum(ops.exp(ops.subtract(logits, top.output(0))), [1], True)
    confidence = ops.divide(ops.constant(np.float32(1)), total)
    return ov.Model([top.output(1), confidence.output(0)], ir.get_parameters(), "class and confidence")


class CompiledGraph:
    """An ov.Model compiled for the CPU with ``config``: a size runs on the dynamic-shape graph
    until it comes back, then on a graph compiled for it (STATIC_SIZES_KEPT)."""

    def __init__(self, model, core, config: dict) -> None:
        self.model, self.core, self.config = model, core, config
        self.dynamic = core.compile_model(model, "CPU", config).create_infer_request()
        self.static: OrderedDict[tuple[int, int], object] = OrderedDict()
        self.seen: Counter[tuple[int, int]] = Counter()

    def request_for(self, size: tuple[int, int]):  # -> openvino.InferRequest
        if size in self.static:
            self.static.move_to_end(size)
            return self.static[size]
        self.seen[size] += 1
        if self.seen[size] < 2:
            return self.dynamic
        fixed = self.model.clone()
        fixed.reshape([1, 3, *size])
        self.static[size] = self.core.compile_model(fixed, "CPU", self.config).create_infer_request()
        if len(self.static) > STATIC_SIZES_KEPT:
            self.static.popitem(last=False)
        return self.static[size]


class OpenVINOForward:
    """An IR run on the CPU: called, 1 x 3 x h x w input -> 1 x C x h x w logits;
    ``class_and_confidence`` -> the H x W class ids and confidence from a graph that computes them
    (the service's path, compiled at once; the logits' graph is compiled when first called).

    The precision hint of ``precision`` is said explicitly (on CPUs with AMX, OpenVINO would
    otherwise choose bf16), on ``threads`` threads (default: torch's count in this process, set
    after gunicorn's fork)."""

    def __init__(self, ir, threads: int | None = None, precision: str = "fp32") -> None:
        # No pinning: pinned, gunicorn's workers of one thread each shared cores (bench/serve.py, 2 x 1,
        # 4 clients, 2-core AVX2 EPYC: 0.87 req/s pinned, 1.56 unpinned, torch 1.37).
        self.config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "ENABLE_CPU_PINNING": False}
        self.ir = ir
        self.core = openvino().Core()
        self.heads = CompiledGraph(with_class_and_confidence(ir), self.core, self.config)
        self.logits: CompiledGraph | None = None
        self.lock = threading.Lock()  # an infer request runs one input at a time and reuses its output buffers

    def outputs(self, graph: CompiledGraph, batch: torch.Tensor,
                memory_format: torch.memory_format = torch.contiguous_format) -> list[torch.Tensor]:
        """Copies, in ``memory_format``, of ``graph``'s outputs for ``batch`` (the request's
        buffers are reused by its next input): one copy each, straight from the buffer."""
        with self.lock:
            request = graph.request_for(tuple(batch.shape[-2:]))
            request.infer([batch.float().contiguous().cpu().numpy()])
            return [torch.from_numpy(output.data).clone(memory_format=memory_format)
                    for output in request.output_tensors]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            if self.logits is None:
                self.logits = CompiledGraph(self.ir, self.core, self.config)
        # channels_last, as the torch path's logits are: tiling's softmax reads them pixel-major.
        (logits,) = self.outputs(self.logits, batch, torch.channels_last)
        return logits

    def class_and_confidence(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H x W int64 class ids and float32 confidence of the first image of ``batch``."""
        class_ids, confidence = self.outputs(self.heads, batch)
        return class_ids[0, 0].long(), confidence[0, 0]
