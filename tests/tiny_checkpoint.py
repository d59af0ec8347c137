"""A tiny, randomly initialised U-Net checkpoint for tests of everything that serves a model."""
from __future__ import annotations

from pathlib import Path

import torch

from model import build_model, model_meta
from utils.checkpoint import save_checkpoint
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CLASS_NAMES = ["background", "water", "<b>tag</b>"]  # the third checks that pages escape names


def make_checkpoint(path: Path, class_names: list[str] = CLASS_NAMES, base_width: int = 4,
                    varied: bool = False) -> Path:
    """``varied``: zero the output layer's bias, whose random values make the untrained net call
    every pixel one class; without it the classes change over a photo (noise gets all three)."""
    torch.manual_seed(0)
    arch_args = {"num_classes": len(class_names), "base_width": base_width, "bilinear": True}
    model = build_model("unet", **arch_args)
    if varied:
        torch.nn.init.zeros_(model.outc.bias)
    meta = model_meta("unet", arch_args, class_names, [64, 64], IMAGENET_MEAN, IMAGENET_STD)
    meta["metrics"] = {"miou": 0.5}
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta})
    return path
