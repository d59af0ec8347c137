"""Whether a reduced precision may serve a checkpoint on a runtime: fp32 and reduced-precision
predictions compared on validation images, one verdict per runtime and dtype (``cpu/bf16``: torch
on the CPU; ``cuda/fp16``: torch on the GPU, where fp16 overflows where bf16 only rounds;
``openvino/int8`` and ``openvino/bf16``: OpenVINO on the CPU).  One rule judges them all (passes).

The verdicts live beside the checkpoint as ``<checkpoint>.guard.json`` (written by
tools/guard_precision.py and tools/quantize.py), not inside it: the checkpoint file, and so the
sha256 its model card records, stays unchanged.  The record names the checkpoint's sha256, so a
checkpoint retrained to the same path never inherits an old verdict.

    {"checkpoint_sha256": "...", "verdicts": {"cpu/bf16": {"agreement": 0.9987,
     "worst_image_agreement": 0.991, "miou_fp32": 0.41, "miou_bf16": 0.409, "miou_drop_points": 0.1,
     "worst_class": {...}, "disagreements": {...}, "images": 50, "pixels": 12345678, "ok": true, ...}}}

A record written before verdicts were per device (the ``cpu/bf16`` fields at the top level) is
read as the ``cpu/bf16`` verdict.  The rule is applied again when a verdict is read, so one
measured under an older rule is judged by today's (one without a per-image figure fails).  A CPU
verdict names the kind of CPU it was measured on (utils/precision.py cpu_kind: bf16 and INT8
kernels round differently on AVX2, AVX-512 VNNI, AVX-512 BF16 and AMX) and is honoured on that
kind only; one without it, from before the rule, is not.
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
from utils.precision import cpu_kind

# The one rule for every reduced precision: a user looks at one photo, not at the mean, so each
# image has a floor of its own besides the mean over all pixels.
MIN_AGREEMENT = 0.99  # fraction of all pixels whose class is the same in fp32 and the reduced precision
MIN_IMAGE_AGREEMENT = 0.97  # the same fraction on the worst single image
MAX_MIOU_DROP_POINTS = 0.5  # mIoU(fp32) - mIoU(reduced), in points (0-100 scale)
NEAR_TIE = 0.1  # fp32's top-1 minus top-2 probability below which a changed pixel is boundary noise

ClassMapOf = Callable[[Image.Image], np.ndarray]  # an image -> its H x W class map
# an image -> (its H x W fp32 class map, the H x W margin of fp32's top-1 over its top-2 probability)
ClassMapAndMarginOf = Callable[[Image.Image], tuple[np.ndarray, np.ndarray]]


def guard_path(checkpoint: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(checkpoint)}.guard.json")


def passes(figures: dict) -> bool:
    """The service's rule for serving in any reduced precision (figures from compare_precisions)."""
    drop = figures.get("miou_drop_points")
    return (figures.get("agreement", 0.0) >= MIN_AGREEMENT
            and figures.get("worst_image_agreement", 0.0) >= MIN_IMAGE_AGREEMENT
            and drop is not None and drop <= MAX_MIOU_DROP_POINTS)


def compare_precisions(fp32: ClassMapAndMarginOf, reduced: ClassMapOf,
                       samples: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int, dtype: str = "bf16") -> dict:
    """Pixel agreement of the two class maps, overall and on the worst image; each one's mIoU
    (``miou_fp32``, ``miou_<dtype>``) and the class whose IoU changed most; and where the changed
    pixels fall: how many were near-ties in fp32 (boundary noise) rather than real changes.

    ``samples`` yields (H x W x 3 uint8 image, H x W mask); both predictors see the image as the
    service would (a PIL image, resized and mapped back by the predictor itself).
    """
    matrices = {"fp32": ConfusionMatrix(num_classes), dtype: ConfusionMatrix(num_classes)}
    per_image, changed_margins = [], []
    for image, mask in samples:
        photo = Image.fromarray(image)
        (exact, margin), approximate = fp32(photo), reduced(photo)
        changed = exact != approximate
        per_image.append((mask.size - int(np.count_nonzero(changed)), mask.size))
        changed_margins.append(margin[changed])
        for name, class_map in (("fp32", exact), (dtype, approximate)):
            matrices[name].update(torch.from_numpy(mask), torch.from_numpy(class_map))
    if not per_image:
        raise ValueError("no validation images to compare on")
    scores = {name: matrix.compute() for name, matrix in matrices.items()}
    miou = {name: score["miou"] for name, score in scores.items()}
    drop = None if None in miou.values() else (miou["fp32"] - miou[dtype]) * 100
    agreeing, pixels = (sum(counts) for counts in zip(*per_image, strict=True))
    worst = min(range(len(per_image)), key=lambda i: per_image[i][0] / per_image[i][1])
    return {"agreement": agreeing / pixels, "worst_image_agreement": per_image[worst][0] / per_image[worst][1],
            "worst_image": worst, "images_below_floor": sum(a / n < MIN_IMAGE_AGREEMENT for a, n in per_image),
            "miou_fp32": miou["fp32"], f"miou_{dtype}": miou[dtype], "miou_drop_points": drop,
            "worst_class": worst_class_change(scores["fp32"]["iou"], scores[dtype]["iou"]),
            "disagreements": where_changes_fall(np.concatenate(changed_margins)),
            "images": len(per_image), "pixels": pixels}


def worst_class_change(fp32: Sequence[float | None], reduced: Sequence[float | None]) -> dict | None:
    """The class whose IoU moved most (either way), in points; None when no class has both IoUs."""
    changes = [(abs(b - a), index, a, b) for index, (a, b) in enumerate(zip(fp32, reduced, strict=True))
               if a is not None and b is not None]
    if not changes:
        return None
    _, index, before, after = max(changes)
    return {"class_id": index, "iou_fp32": before, "iou_reduced": after, "change_points": (after - before) * 100}


def where_changes_fall(margins: np.ndarray) -> dict:
    """How many pixels changed class, and the share of them that fp32 itself nearly tied."""
    if not margins.size:
        return {"pixels": 0, "near_tie_share": None, "median_fp32_margin": None, "near_tie": NEAR_TIE}
    return {"pixels": int(margins.size), "near_tie_share": float(np.mean(margins < NEAR_TIE)),
            "median_fp32_margin": float(np.median(margins)), "near_tie": NEAR_TIE}


def verdict_key(device: str, dtype: str) -> str:
    return f"{device}/{dtype}"


def write_guard(checkpoint: str | os.PathLike, figures: dict, device: str = "cpu", dtype: str = "bf16") -> dict:
    """Record ``figures`` (from compare_precisions, plus what the caller adds) with the verdict for
    ``device``/``dtype`` beside ``checkpoint``, keeping this checkpoint's verdicts for the others;
    returns the verdict."""
    verdict = dict(figures, ok=passes(figures), min_agreement=MIN_AGREEMENT,
                   min_image_agreement=MIN_IMAGE_AGREEMENT, max_miou_drop_points=MAX_MIOU_DROP_POINTS,
                   measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if device != "cuda":
        verdict["cpu"] = cpu_kind()
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


def measured_here(verdict: dict, device: str) -> bool:
    """Whether a verdict was measured on this kind of CPU (a GPU verdict: always)."""
    return device == "cuda" or verdict.get("cpu") == cpu_kind()


def honoured(verdict: dict | None, device: str) -> bool:
    """Whether ``verdict`` lets its precision serve here: it passes, and was measured on this kind of CPU."""
    return verdict is not None and passes(verdict) and measured_here(verdict, device)


def precision_allowed(checkpoint: str | os.PathLike, device: str = "cpu", dtype: str = "bf16") -> bool:
    return honoured(read_guard(checkpoint, device, dtype), device)


def describe(verdict: dict, key: str, dtype: str, class_names: Sequence[str]) -> str:
    """The verdict as the tools print it: each figure beside the threshold it is held to."""
    def figure(value: float | None, digits: int) -> str:
        return "undefined" if value is None else f"{value:.{digits}f}"

    where = f", measured on a {verdict['cpu']} CPU" if "cpu" in verdict else ""
    lines = [f"{verdict['images']} images, {verdict['pixels']:,} pixels, {key}{where}",
             f"argmax agreement fp32 vs {dtype}: {verdict['agreement']:.4%} (needs >= {MIN_AGREEMENT:.0%}); "
             f"worst image {verdict['worst_image_agreement']:.4%} (needs >= {MIN_IMAGE_AGREEMENT:.0%}), "
             f"{verdict['images_below_floor']} images below that",
             f"mIoU fp32 {figure(verdict['miou_fp32'], 4)}, {dtype} {figure(verdict[f'miou_{dtype}'], 4)}: drop "
             f"{figure(verdict['miou_drop_points'], 3)} points (needs <= {MAX_MIOU_DROP_POINTS})"]
    worst = verdict["worst_class"]
    if worst is not None:
        lines.append(f"largest class IoU change: {class_names[worst['class_id']]} {worst['iou_fp32']:.3f} -> "
                     f"{worst['iou_reduced']:.3f} ({worst['change_points']:+.2f} points)")
    changed = verdict["disagreements"]
    if changed["pixels"]:
        lines.append(f"changed pixels: {changed['pixels']:,}, {changed['near_tie_share']:.1%} of them near-ties in "
                     f"fp32 (top-1 minus top-2 probability < {changed['near_tie']}); median margin "
                     f"{changed['median_fp32_margin']:.3f}")
    lines.append(f"verdict: {dtype + ' allowed' if verdict['ok'] else 'refused, fp32 serves'}")
    return "\n".join(lines)
