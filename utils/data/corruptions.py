"""Image corruptions at severities 1-5, for test.py's robustness report (Kamann & Rother, CVPR 2020).

The 15 corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019), with its published severity
parameters, made with torch, kornia and Pillow: the ``imagecorruptions`` package does not run on
our stack (it calls scikit-image with ``multichannel=``, removed in 0.19, imports ``pkg_resources``
and wants the non-headless opencv-python).  Where ours differ from the original: ``frost`` lays a
plasma-fractal ice texture (ImageNet-C's frost photos are not ours to ship),
``glass_blur`` moves every pixel by a random local offset at once rather than swapping pixels one
by one, ``motion_blur`` is kornia's line kernel, and ``elastic_transform`` is a smooth random
warp of our own (ImageNet-C's adds an affine part tuned to 224-pixel crops).
Besides them, the effects of our own ``weather`` training preset (utils/data/augment.py) at five
strengths: ``weather_fog``, ``weather_flare``, ``weather_rain``, ``weather_shadow``.

Every corruption takes the image alone (the mask is never touched), severity 0 is the image
itself, and the same (image, name, severity, seed) gives the same pixels.  This module is the
catalogue (names, groups, parsing); the effects are in utils/data/corruption_effects.py.
"""
from __future__ import annotations

import numpy as np
import torch

from utils.errors import UserError

SEVERITIES = (1, 2, 3, 4, 5)
IMAGENET_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")
WEATHER = ("weather_fog", "weather_flare", "weather_rain", "weather_shadow")
CORRUPTIONS = IMAGENET_C + WEATHER  # each the name of its function in utils/data/corruption_effects.py
GROUPS = {"all": list(CORRUPTIONS), "imagenet-c": list(IMAGENET_C), "weather": list(WEATHER)}


class CorruptionError(UserError):
    """An unknown corruption name or a severity outside 0-5."""


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """H x W x 3 uint8 ``image`` under corruption ``name`` at ``severity`` (0: the image itself);
    the random draws come from ``seed`` alone."""
    if name not in CORRUPTIONS:
        raise CorruptionError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if not 0 <= severity <= 5:
        raise CorruptionError(f"severity must be 0-5, not {severity}")
    if severity == 0:
        return image.copy()
    from utils.data import corruption_effects  # only here: kornia and torchvision take ~4 s to import

    batch = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    with torch.random.fork_rng(devices=[]):  # torchvision and kornia draw from torch's generator
        torch.manual_seed(seed)
        corrupted = getattr(corruption_effects, name)(batch, severity)
    return (corrupted[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def parse_corruptions(text: str) -> list[str]:
    """``gaussian_noise,fog`` or a group (all, imagenet-c, weather) -> corruption names, in order, once each."""
    names: list[str] = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        for name in GROUPS.get(part, [part]):
            if name not in CORRUPTIONS:
                raise CorruptionError(f"unknown corruption {name!r}; known: {', '.join([*GROUPS, *CORRUPTIONS])}")
            if name not in names:
                names.append(name)
    if not names:
        raise CorruptionError("--corruptions names no corruption")
    return names


def parse_severities(text: str) -> list[int]:
    """``1-5``, ``3`` or ``1,3,5`` -> the severities, each within 1-5."""
    try:
        if "-" in text:
            low, high = (int(part) for part in text.split("-", 1))
            severities = list(range(low, high + 1))
        else:
            severities = [int(part) for part in text.split(",")]
    except ValueError:
        raise CorruptionError(f"severities must look like 1-5 or 1,3,5, not {text!r}") from None
    if not severities or any(severity not in SEVERITIES for severity in severities):
        raise CorruptionError(f"severities must be within 1-5, not {text!r}")
    return sorted(set(severities))
