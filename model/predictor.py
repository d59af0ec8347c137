"""The one inference path: checkpoint in, per-pixel classes and confidences out.

The web app, test_draw.py and predict.py all go through ``Predictor.predict`` so that an
image is decoded, resized, normalised and decoded back in exactly one way.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model import build_from_meta, main_logits
from utils.checkpoint import load_checkpoint
from utils.classes import palette
from utils.fileio import to_rgb
from utils.transforms import padded_size, to_tensor


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """``prefer`` when given, else CUDA when available, else the CPU."""
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class PreprocessInfo:
    """Where the network input came from, so its output can be mapped back."""
    original_size: tuple[int, int]  # (height, width) after EXIF rotation
    resized_size: tuple[int, int]  # (height, width) before the bottom/right padding


@dataclass
class Prediction:
    class_map: np.ndarray  # H x W class ids at the original size (uint8 up to 256 classes)
    confidence: np.ndarray  # H x W float32 softmax probability of the predicted class
    inference_ms: float  # the whole predict call: preprocessing, network, mapping back


def fit_long_side(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``long_side``, aspect kept, at least 1 pixel."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def top_class_and_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C x H x W logits -> (H x W argmax, H x W softmax probability of that class)."""
    logits = logits.float()
    top_logit, class_ids = logits.max(dim=0)
    # The softmax of the top class is 1 / sum(exp(logit - top)): no full softmax tensor needed.
    confidence = (logits - top_logit).exp_().sum(dim=0).reciprocal_()
    return class_ids, confidence


def resize_nearest(planes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """K x h x w float planes -> K x height x width, each output pixel from its nearest source pixel."""
    return F.interpolate(planes[None], size=(height, width), mode="nearest-exact")[0]


def class_map_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int32


class Predictor:
    """A model rebuilt from a checkpoint, with the preprocessing its ``meta`` prescribes."""

    def __init__(self, model: nn.Module, meta: dict, device: torch.device) -> None:
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.num_classes: int = meta["num_classes"]
        self.input_size: tuple[int, int] = tuple(meta["input_size"])
        self.device = device
        self.model = model.to(device, memory_format=torch.channels_last).eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        threads: int | None = None) -> Predictor:
        if threads is not None:
            torch.set_num_threads(threads)
        device = pick_device(device)
        checkpoint = load_checkpoint(path, map_location=device)
        model = build_from_meta(checkpoint["meta"])
        model.load_state_dict(checkpoint["model"])
        return cls(model, checkpoint["meta"], device)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, PreprocessInfo]:
        """1 x 3 x h x w network input: long side scaled to the training size, normalised,
        zero-padded bottom/right to a size the network accepts, as in evaluation."""
        rgb = to_rgb(image)
        resized = rgb.resize(fit_long_side(*rgb.size, max(self.input_size)), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized)
        height, width = pixels.shape[:2]
        padded_height, padded_width = padded_size(height, width)
        pixels = np.pad(pixels, ((0, padded_height - height), (0, padded_width - width), (0, 0)))
        batch = to_tensor(pixels, self.meta["mean"], self.meta["std"])[None]
        info = PreprocessInfo(original_size=(rgb.height, rgb.width), resized_size=(height, width))
        return batch.to(self.device, memory_format=torch.channels_last), info

    @torch.inference_mode()
    def predict(self, image: Image.Image) -> Prediction:
        """Class ids and confidences for every pixel of ``image`` (EXIF rotation applied)."""
        started = time.perf_counter()
        batch, info = self.preprocess(image)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            logits = main_logits(self.model(batch))
        height, width = info.resized_size
        class_ids, confidence = top_class_and_confidence(logits[0, :, :height, :width])
        # Mapping the two maps back, never the C-channel logits, keeps large images cheap.
        class_plane, confidence_plane = resize_nearest(torch.stack([class_ids.float(), confidence]),
                                                       *info.original_size)
        return Prediction(class_map=class_plane.to(class_map_dtype(self.num_classes)).cpu().numpy(),
                          confidence=confidence_plane.cpu().numpy(),
                          inference_ms=(time.perf_counter() - started) * 1000)


def summarize(prediction: Prediction, class_names: list[str]) -> list[dict]:
    """One entry per class present (id, name, area in pixels, area_ratio, mean_confidence),
    largest area first."""
    class_ids = prediction.class_map.ravel()
    areas = np.bincount(class_ids, minlength=len(class_names))
    confidence_sums = np.bincount(class_ids, weights=prediction.confidence.ravel(), minlength=len(class_names))
    present = np.flatnonzero(areas)
    present = present[np.argsort(-areas[present], kind="stable")]
    return [{"id": int(class_id), "name": class_names[class_id], "area": int(areas[class_id]),
             "area_ratio": float(areas[class_id] / class_ids.size),
             "mean_confidence": float(confidence_sums[class_id] / areas[class_id])}
            for class_id in present]


def render_overlay(image: Image.Image, class_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``image`` with each class's palette colour blended in at ``alpha``; background stays the photo."""
    pixels = np.asarray(to_rgb(image), dtype=np.float32)
    if pixels.shape[:2] != class_map.shape:
        raise ValueError(f"class map {class_map.shape} does not match the image {pixels.shape[:2]}")
    colours = palette(int(class_map.max()) + 1)[class_map].astype(np.float32)
    blended = np.where((class_map > 0)[..., None], (1 - alpha) * pixels + alpha * colours, pixels)
    return Image.fromarray(np.rint(blended).astype(np.uint8))
