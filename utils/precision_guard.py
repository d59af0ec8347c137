"""Whether bf16 may serve a checkpoint: fp32 and bf16 predictions compared on a validation set.

The verdict lives beside the checkpoint as ``<checkpoint>.guard.json`` (written by
tools/guard_precision.py), not inside it: the checkpoint file, and so the sha256 its model card
records, stays unchanged.  The record names the checkpoint's sha256, so a checkpoint
retrained to the same path never inherits an old verdict.

    {"agreement": 0.9987, "miou_fp32": 0.41, "miou_bf16": 0.409, "miou_drop_points": 0.1,
     "images": 50, "pixels": 12345678, "ok": true, "min_agreement": 0.995,
     "max_miou_drop_points": 0.2, "checkpoint_sha256": "...", "measured": "2026-11-22T08:10:00Z"}
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

from utils.fileio import file_sha256, write_text
from utils.metrics import ConfusionMatrix

MIN_AGREEMENT = 0.995  # fraction of pixels whose class is the same in fp32 and bf16
MAX_MIOU_DROP_POINTS = 0.2  # mIoU(fp32) - mIoU(bf16), in points (0-100 scale)

ClassMapOf = Callable[[Image.Image], np.ndarray]  # an image -> its H x W class map


def guard_path(checkpoint: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(checkpoint)}.guard.json")


def passes(agreement: float, miou_drop_points: float | None) -> bool:
    """The service's rule for serving in bf16."""
    return (agreement >= MIN_AGREEMENT and miou_drop_points is not None
            and miou_drop_points <= MAX_MIOU_DROP_POINTS)


def compare_precisions(fp32: ClassMapOf, bf16: ClassMapOf, samples: Sequence[tuple[np.ndarray, np.ndarray]],
                       num_classes: int) -> dict:
    """Pixel agreement of the two class maps and each one's mIoU against the masks.

    ``samples`` yields (H x W x 3 uint8 image, H x W mask); both predictors see the image as the
    service would (a PIL image, resized and mapped back by the predictor itself).
    """
    matrices = {"fp32": ConfusionMatrix(num_classes), "bf16": ConfusionMatrix(num_classes)}
    agreeing = pixels = images = 0
    for image, mask in samples:
        photo = Image.fromarray(image)
        maps = {"fp32": fp32(photo), "bf16": bf16(photo)}
        agreeing += int(np.count_nonzero(maps["fp32"] == maps["bf16"]))
        pixels += mask.size
        images += 1
        for name, class_map in maps.items():
            matrices[name].update(torch.from_numpy(mask), torch.from_numpy(class_map))
    if not pixels:
        raise ValueError("no validation images to compare on")
    miou = {name: matrix.compute()["miou"] for name, matrix in matrices.items()}
    drop = None if None in miou.values() else (miou["fp32"] - miou["bf16"]) * 100
    return {"agreement": agreeing / pixels, "miou_fp32": miou["fp32"], "miou_bf16": miou["bf16"],
            "miou_drop_points": drop, "images": images, "pixels": pixels}


def write_guard(checkpoint: str | os.PathLike, figures: dict) -> dict:
    """Record ``figures`` (from compare_precisions) with the verdict beside ``checkpoint``."""
    record = dict(figures, ok=passes(figures["agreement"], figures["miou_drop_points"]),
                  min_agreement=MIN_AGREEMENT, max_miou_drop_points=MAX_MIOU_DROP_POINTS,
                  checkpoint_sha256=file_sha256(checkpoint),
                  measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_text(guard_path(checkpoint), json.dumps(record, indent=1) + "\n")
    return record


def read_guard(checkpoint: str | os.PathLike) -> dict | None:
    """The record for this very checkpoint file, or None (absent, unreadable, or another file's)."""
    try:
        record = json.loads(guard_path(checkpoint).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("checkpoint_sha256") != file_sha256(checkpoint):
        return None
    return record


def bf16_allowed(checkpoint: str | os.PathLike) -> bool:
    record = read_guard(checkpoint)
    return bool(record and record.get("ok") is True)
