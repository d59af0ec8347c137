"""Whether a reduced precision may serve a checkpoint on a device: fp32 and reduced-precision
predictions compared on a validation set, one verdict per device and dtype (``cpu/bf16``, the
CPU's; ``cuda/fp16``, the GPU's: fp16 overflows where bf16 only rounds, so neither stands in
for the other).

The verdicts live beside the checkpoint as ``<checkpoint>.guard.json`` (written by
tools/guard_precision.py), not inside it: the checkpoint file, and so the sha256 its model card
records, stays unchanged.  The record names the checkpoint's sha256, so a checkpoint
retrained to the same path never inherits an old verdict.

    {"checkpoint_sha256": "...", "verdicts": {"cpu/bf16": {"agreement": 0.9987, "miou_fp32": 0.41,
     "miou_bf16": 0.409, "miou_drop_points": 0.1, "images": 50, "pixels": 12345678, "ok": true,
     "min_agreement": 0.995, "max_miou_drop_points": 0.2, "measured": "2026-11-22T08:10:00Z"}}}

A record written before verdicts were per device (the ``cpu/bf16`` fields at the top level) is
read as the ``cpu/bf16`` verdict.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.evaluation.metrics import ConfusionMatrix
from utils.fileio import file_sha256, write_text

MIN_AGREEMENT = 0.995  # fraction of pixels whose class is the same in fp32 and the reduced precision
MAX_MIOU_DROP_POINTS = 0.2  # mIoU(fp32) - mIoU(reduced), in points (0-100 scale)

ClassMapOf = Callable[[Image.Image], np.ndarray]  # an image -> its H x W class map


def guard_path(checkpoint: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(checkpoint)}.guard.json")


def passes(agreement: float, miou_drop_points: float | None) -> bool:
    """The service's rule for serving in a reduced precision."""
    return (agreement >= MIN_AGREEMENT and miou_drop_points is not None
            and miou_drop_points <= MAX_MIOU_DROP_POINTS)


def compare_precisions(fp32: ClassMapOf, reduced: ClassMapOf, samples: Sequence[tuple[np.ndarray, np.ndarray]],
                       num_classes: int, dtype: str = "bf16") -> dict:
    """Pixel agreement of the two class maps and each one's mIoU (``miou_fp32``, ``miou_<dtype>``).

    ``samples`` yields (H x W x 3 uint8 image, H x W mask); both predictors see the image as the
    service would (a PIL image, resized and mapped back by the predictor itself).
    """
    matrices = {"fp32": ConfusionMatrix(num_classes), dtype: ConfusionMatrix(num_classes)}
    agreeing = pixels = images = 0
    for image, mask in samples:
        photo = Image.fromarray(image)
        maps = {"fp32": fp32(photo), dtype: reduced(photo)}
        agreeing += int(np.count_nonzero(maps["fp32"] == maps[dtype]))
        pixels += mask.size
        images += 1
        for name, class_map in maps.items():
            matrices[name].update(torch.from_numpy(mask), torch.from_numpy(class_map))
    if not pixels:
        raise ValueError("no validation images to compare on")
    miou = {name: matrix.compute()["miou"] for name, matrix in matrices.items()}
    drop = None if None in miou.values() else (miou["fp32"] - miou[dtype]) * 100
    return {"agreement": agreeing / pixels, "miou_fp32": miou["fp32"], f"miou_{dtype}": miou[dtype],
            "miou_drop_points": drop, "images": images, "pixels": pixels}


def verdict_key(device: str, dtype: str) -> str:
    return f"{device}/{dtype}"


def write_guard(checkpoint: str | os.PathLike, figures: dict, device: str = "cpu", dtype: str = "bf16") -> dict:
    """Record ``figures`` (from compare_precisions) with the verdict for ``device``/``dtype`` beside
    ``checkpoint``, keeping this checkpoint's verdicts for the others; returns the verdict."""
    verdict = dict(figures, ok=passes(figures["agreement"], figures["miou_drop_points"]),
                   min_agreement=MIN_AGREEMENT, max_miou_drop_points=MAX_MIOU_DROP_POINTS,
                   measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    verdicts = dict(read_verdicts(checkpoint), **{verdict_key(device, dtype): verdict})
    record = {"checkpoint_sha256": file_sha256(checkpoint), "verdicts": verdicts}
    write_text(guard_path(checkpoint), json.dumps(record, indent=1) + "\n")
    return verdict


def read_verdicts(checkpoint: str | os.PathLike) -> dict[str, dict]:
    """Every verdict recorded for this very checkpoint file ({} when absent, unreadable, or another file's)."""
    try:
        record = json.loads(guard_path(checkpoint).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("checkpoint_sha256") != file_sha256(checkpoint):
        return {}
    if "verdicts" not in record:  # the single cpu/bf16 record of before
        legacy = {k: v for k, v in record.items() if k != "checkpoint_sha256"}
        return {verdict_key("cpu", "bf16"): legacy}
    verdicts = record["verdicts"]
    return verdicts if isinstance(verdicts, dict) else {}


def read_guard(checkpoint: str | os.PathLike, device: str = "cpu", dtype: str = "bf16") -> dict | None:
    """The verdict for ``device``/``dtype`` of this very checkpoint file, or None."""
    verdict = read_verdicts(checkpoint).get(verdict_key(device, dtype))
    return verdict if isinstance(verdict, dict) else None


def precision_allowed(checkpoint: str | os.PathLike, device: str = "cpu", dtype: str = "bf16") -> bool:
    verdict = read_guard(checkpoint, device, dtype)
    return bool(verdict and verdict.get("ok") is True)
