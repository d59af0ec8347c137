"""The steps of the training augmentation presets beyond ``basic`` (utils/data/augment.py names
them): torchvision.transforms.v2 geometry on image and mask, colour, camera and weather effects on
the image alone.  Apart from the catalogue because kornia and torchvision take ~4 s to import,
which train.py pays only for a preset that needs them.
"""
from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
import numpy as np
import torch
import torch.nn.functional as F
from kornia.contrib import diamond_square
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from utils.classes import IGNORE_INDEX

FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}  # what uncovered pixels become


class GridDistortion(v2.Transform):
    """albumentations' GridDistortion, which torchvision lacks: the crop is cut into ``steps`` x
    ``steps`` cells whose heights and widths are each stretched or shrunk by up to ``limit``, and
    every pixel is resampled from where it falls in the distorted grid (rows and columns apart,
    so grid lines stay straight).  The edges stay in place, so no pixel is left uncovered.
    Images are resampled bilinearly, masks nearest (no new class ids)."""

    def __init__(self, steps: int = 5, limit: float = 0.3) -> None:
        super().__init__()
        self.steps, self.limit = steps, limit

    def source_positions(self, length: int) -> torch.Tensor:
        """For each of ``length`` output positions, where it samples from, in grid_sample's [-1, 1]."""
        cells = torch.empty(self.steps).uniform_(1 - self.limit, 1 + self.limit)
        edges = torch.cat([torch.zeros(1), cells.cumsum(0)]) / cells.sum()
        position = torch.linspace(0, 1, length) * self.steps
        cell = position.floor().long().clamp(max=self.steps - 1)
        within = position - cell
        return (edges[cell] + within * (edges[cell + 1] - edges[cell])) * 2 - 1

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        rows, columns = self.source_positions(height), self.source_positions(width)
        grid_y, grid_x = torch.meshgrid(rows, columns, indexing="ij")
        return {"grid": torch.stack([grid_x, grid_y], dim=-1)[None]}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        is_mask = isinstance(inpt, tv_tensors.Mask)
        planes = inpt.as_subclass(torch.Tensor).float().reshape(1, -1, *inpt.shape[-2:])
        moved = F.grid_sample(planes, params["grid"], mode="nearest" if is_mask else "bilinear", align_corners=True)
        moved = moved.reshape(inpt.shape)
        if not inpt.is_floating_point():
            moved = moved.round().clamp(0, torch.iinfo(inpt.dtype).max)
        return tv_tensors.wrap(moved.to(inpt.dtype), like=inpt)


def moving_geometry() -> v2.Transform:
    """Rotation/shift/scale and a grid distortion (albumentations' ShiftScaleRotate and
    GridDistortion): torchvision's affine, and GridDistortion above."""
    return v2.Compose([
        v2.RandomApply([v2.RandomAffine(degrees=15, translate=(0.0625, 0.0625), scale=(0.9, 1.1), fill=FILL)], p=0.5),
        v2.RandomApply([GridDistortion()], p=0.3),
    ])


def colour_and_camera() -> v2.Transform:
    """uint8 image -> float image in [0, 1], with the colour and camera effects."""
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(brightness=0.25, contrast=0.25)], p=0.5),
        v2.RandomApply([v2.ColorJitter(saturation=0.3, hue=0.05)], p=0.5),
        v2.RandomApply([v2.JPEG(quality=(40, 95))], p=0.3),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.RandomChoice([v2.GaussianBlur(kernel_size=5, sigma=(0.3, 1.5)),
                                         v2.GaussianNoise(sigma=0.03)])], p=0.3),
    ])


class Fog(nn.Module):
    """A haze: the image blended toward light grey by a plasma fractal (kornia's diamond-square),
    thick in places and thin in others.  kornia has no fog of its own: its plasma brightness
    shifts each colour channel by a map of its own, which tints rather than fogs."""

    def __init__(self, density: tuple[float, float] = (0.3, 0.7), roughness: tuple[float, float] = (0.2, 0.5),
                 colour: float = 0.85) -> None:
        super().__init__()
        self.density, self.roughness, self.colour = density, roughness, colour

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        roughness = float(torch.empty(()).uniform_(*self.roughness))
        density = float(torch.empty(()).uniform_(*self.density))
        haze = diamond_square((images.shape[0], 1, *images.shape[-2:]), roughness, normalize_range=(0.0, 1.0),
                              dtype=images.dtype)
        alpha = density * haze  # one map for all channels: fog greys, it does not tint
        return images * (1 - alpha) + self.colour * alpha


def weather_effects(crop_size: int) -> v2.Transform:
    """One of fog, sun flare (a bright gaussian spot), rain, or shadow (a plasma-fractal shade);
    on a 1 x 3 x H x W float batch in [0, 1].  Rain falls as densely on any crop size: one drop per
    500-1000 pixels, albumentations' drizzle to torrential."""
    area = crop_size * crop_size
    return v2.RandomApply([v2.RandomChoice([
        Fog(),
        K.RandomGaussianIllumination(gain=(0.2, 0.5), sign=(1.0, 1.0), p=1.0),
        K.RandomRain(number_of_drops=(area // 1000, area // 500), drop_height=(5, 15), drop_width=(-3, 3), p=1.0),
        K.RandomPlasmaShadow(roughness=(0.1, 0.5), shade_intensity=(-0.6, 0.0), p=1.0),
    ])], p=0.5)


@dataclass
class Augmentation:
    """A preset's steps after ``basic``: ``geometry`` on image and mask, ``photometric`` and
    ``weather`` on the image alone."""
    geometry: v2.Transform | None
    photometric: v2.Transform
    weather: v2.Transform | None

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """HxWx3 uint8 image and HxW uint8 mask -> 3xHxW float image in [0, 1] and HxW int64 mask."""
        pixels = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        labels = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))
        # torchvision and kornia draw from torch's generator: seed it for this sample only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.geometry is not None:
                pixels, labels = self.geometry(pixels, labels)
            pixels = self.photometric(pixels.as_subclass(torch.Tensor))
            if self.weather is not None:
                pixels = self.weather(pixels[None]).squeeze(0).clamp(0, 1)
        return pixels, labels.as_subclass(torch.Tensor).long()

