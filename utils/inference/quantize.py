"""INT8 on OpenVINO: NNCF post-training quantization of a checkpoint's IR, judged by the precision
guard on validation images that calibration never saw.

Calibration feeds the network its inputs exactly as the Predictor makes them, from training
images.  The verdict compares OpenVINO fp32 with INT8, both through ``Predictor.predict``, on the
validation images, by the one rule of utils/inference/precision_guard.py, and is recorded as
``openvino/int8`` in ``<checkpoint>.guard.json`` with the sha256 of the INT8 xml and bin
(``<checkpoint>.int8.{xml,bin}``, utils/inference/openvino_runtime.py).  An IR that fails is
removed (unless kept for benchmarks): only the verdict, with its figures, stays.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.inference.openvino_runtime import GUARD_DEVICE, OpenVINOForward, int8_xml, ir_for, save_ir
from utils.inference.precision_guard import compare_precisions, write_guard
from utils.inference.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How NNCF quantizes: ``calibration_images`` statistics, the mixed preset (symmetric weights,
    asymmetric activations: the decoder's inputs are not centred on zero), full bias correction,
    and the operations whose names contain one of ``float_layers`` kept in float."""
    calibration_images: int = 64
    fast_bias_correction: bool = False
    float_layers: tuple[str, ...] = field(default_factory=tuple)


DEFAULT_RECIPE = Recipe()


def network_inputs(predictor: Predictor, images: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Each H x W x 3 uint8 image as the 1 x 3 x h x w float32 array the network receives."""
    return [predictor.preprocess(Image.fromarray(image))[0].contiguous().numpy() for image in images]


class NNCFMissing(UserError, ImportError):
    """NNCF is not installed."""


def quantize_ir(ir, inputs: Sequence[np.ndarray], recipe: Recipe):  # -> openvino.Model
    try:
        import nncf
    except ImportError as error:
        raise NNCFMissing("quantizing needs NNCF: pip install -r requirements-dev.txt") from error

    names = [op.get_friendly_name() for op in ir.get_ordered_ops()]
    kept = [name for name in names if any(part in name for part in recipe.float_layers)]
    return nncf.quantize(ir, nncf.Dataset(list(inputs)), subset_size=len(inputs),
                         preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=recipe.fast_bias_correction,
                         ignored_scope=nncf.IgnoredScope(names=kept, validate=False))


def quantize_checkpoint(checkpoint: str | os.PathLike, calibration: Iterable[np.ndarray],
                        validation: Iterable[tuple[np.ndarray, np.ndarray]], recipe: Recipe = DEFAULT_RECIPE,
                        threads: int | None = None, keep_refused: bool = False) -> dict:
    """Write the INT8 IR beside ``checkpoint``, judge it against OpenVINO fp32 on ``validation``
    ((image, mask) pairs) and record the verdict; returns it.  A failing IR is removed unless
    ``keep_refused`` (for benchmarks: its failed verdict keeps it from ever being served)."""
    fp32 = Predictor.from_checkpoint(checkpoint, device="cpu", threads=threads, precision="fp32", backend="openvino")
    ir = ir_for(checkpoint, fp32.model)
    quantized = quantize_ir(ir, network_inputs(fp32, calibration), recipe)
    xml = int8_xml(checkpoint)
    digests = save_ir(quantized, xml)
    int8 = Predictor(fp32.model, fp32.meta, fp32.device, "int8", OpenVINOForward(quantized, threads, "int8"),
                     "openvino")
    figures = compare_precisions(fp32.class_map_and_margin, lambda image: int8.predict(image).class_map,
                                 validation, fp32.num_classes, "int8")
    verdict = write_guard(checkpoint, dict(figures, **digests, calibration_images=recipe.calibration_images,
                                           float_layers=list(recipe.float_layers)), GUARD_DEVICE, "int8")
    if not verdict["ok"] and not keep_refused:
        for path in (xml, xml.with_suffix(".bin")):
            Path(path).unlink(missing_ok=True)
    return verdict
