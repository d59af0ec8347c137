"""Training augmentation presets (train.py --augment): what each adds after ``basic``.

``basic`` is utils.data.transforms.TrainTransform as it always was (random scale 0.75-1.25, horizontal
flip, crop padded with ignore).  The other presets run it first, then, on the crop:

- ``photometric``: brightness/contrast, hue/saturation, JPEG compression, gaussian blur or noise;
- ``weather``: photometric, then one of fog, sun flare, rain or shadow (kornia);
- ``strong``: rotation/shift/scale and a grid distortion (image and mask together), then weather.

Geometry moves image and mask together (torchvision.transforms.v2 with ``tv_tensors.Mask``: masks
are resampled nearest, and uncovered pixels become ignore); photometric and weather effects are
given the image alone, so they cannot touch the mask.  Each sample's random draws come from one
seed drawn from the transform's ``rng``, so a fixed seed gives the same sample twice.  The steps
themselves are in utils/data/augment_effects.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform

if TYPE_CHECKING:
    from utils.data.augment_effects import Augmentation

PRESETS = ("basic", "photometric", "weather", "strong")


def augmentation(preset: str, crop_size: int) -> Augmentation | None:
    """The steps ``preset`` adds after basic at ``crop_size`` (None for basic itself)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; known presets: {', '.join(PRESETS)}")
    if preset == "basic":
        return None
    # Only here: kornia and torchvision take ~4 s to import, paid by every train.py start otherwise.
    from utils.data.augment_effects import Augmentation, colour_and_camera, moving_geometry, weather_effects

    return Augmentation(geometry=moving_geometry() if preset == "strong" else None,
                        photometric=colour_and_camera(),
                        weather=weather_effects(crop_size) if preset in ("weather", "strong") else None)


def train_transform(preset: str, crop_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> TrainTransform:
    """The training transform of ``preset`` at ``crop_size``."""
    return TrainTransform(crop_size=crop_size, mean=mean, std=std, augmentation=augmentation(preset, crop_size))
