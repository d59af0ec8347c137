"""Joint image + mask transforms for training and evaluation.

Images are HxWx3 uint8 RGB arrays, masks HxW uint8 class ids (255 = ignore).  Images are
resized bilinearly and masks with nearest neighbour, so no new label value can appear.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from utils.classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_MULTIPLE = 16  # four 2x poolings in the U-Net


def normalise(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(...) x 3 x H x W float in [0, 1] -> normalised float32, on the image's device and in its memory
    layout: the one normalisation of training, evaluation and the Predictor."""
    mean_planes = torch.tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std_planes = torch.tensor(std, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return image.sub(mean_planes).div_(std_planes)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]."""
    return pixels.float().mul_(np.float32(1 / 255))


def to_tensor(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """HxWx3 uint8 -> normalised 3xHxW float32."""
    # astype copies, so the tensor is writable even when the array (a PIL image's) is not.
    planes = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    return normalise(to_unit_range(planes), mean, std).contiguous()


# (crop, mask, seed) -> float image in [0, 1] and int64 mask: an augmentation preset (utils/data/augment.py)
Augmentation = Callable[[np.ndarray, np.ndarray, int], tuple[torch.Tensor, torch.Tensor]]


def resize_pair(image: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = mask.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))


def pad_pair(image: np.ndarray, mask: np.ndarray, height: int, width: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least height x width: image with 0, mask with ignore."""
    pad_h, pad_w = max(0, height - mask.shape[0]), max(0, width - mask.shape[1])
    if pad_h == 0 and pad_w == 0:
        return image, mask
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return image, mask


def random_crop_pair(image: np.ndarray, mask: np.ndarray, height: int, width: int,
                     rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    top = rng.randint(0, mask.shape[0] - height)
    left = rng.randint(0, mask.shape[1] - width)
    rows, cols = slice(top, top + height), slice(left, left + width)
    return image[rows, cols], mask[rows, cols]


@dataclass
class TrainTransform:
    """Random scale (aspect kept), horizontal flip, crop to ``crop_size`` padding if needed: the
    ``basic`` preset; an ``augmentation`` (utils/data/augment.py) continues from the crop."""
    crop_size: int = 512
    scale_range: tuple[float, float] = (0.75, 1.25)
    flip_probability: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augmentation: Augmentation | None = None

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rng = rng or random
        image, mask = resize_pair(image, mask, rng.uniform(*self.scale_range))
        if rng.random() < self.flip_probability:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image, mask = pad_pair(image, mask, self.crop_size, self.crop_size)
        image, mask = random_crop_pair(image, mask, self.crop_size, self.crop_size, rng)
        if self.augmentation is None:
            return to_tensor(image, self.mean, self.std), torch.from_numpy(mask.astype(np.int64))
        # Drawn after basic's draws, so that basic's samples stay what they always were.
        image01, labels = self.augmentation(image, mask, rng.getrandbits(63))
        return normalise(image01, self.mean, self.std), labels


def padded_size(height: int, width: int, multiple: int = SIZE_MULTIPLE, minimum: int = 0) -> tuple[int, int]:
    """Each side rounded up to a multiple of ``multiple``, and to at least ``minimum``."""
    def round_up(side: int) -> int:
        return max(-(-side // multiple) * multiple, minimum)

    return round_up(height), round_up(width)


@dataclass
class EvalTransform:
    """The whole image, padded bottom/right to a multiple of 16 and to at least ``minimum`` (the
    model's smallest input), mask padding = ignore.

    Padding sits after the image's own pixels, so predictions are cropped back with
    ``prediction[..., :height, :width]``; the padded mask pixels are ignored by metrics.
    """
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    multiple: int = SIZE_MULTIPLE
    minimum: int = 0

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = pad_pair(image, mask, *padded_size(*mask.shape, self.multiple, self.minimum))
        return to_tensor(image, self.mean, self.std), torch.from_numpy(mask.astype(np.int64))
