"""The image corruptions of utils/data/corruptions.py, one function per name: 1 x 3 x H x W in
[0, 1] and a severity 1-5 in, the same out; made with torch, kornia and Pillow.  Apart from the
catalogue because kornia and torchvision take ~4 s to import, which test.py pays only when it
corrupts images.
"""
from __future__ import annotations

import io
import math

import kornia.augmentation as K
import kornia.color
import kornia.filters
import numpy as np
import torch
import torch.nn.functional as F
from kornia.contrib import diamond_square
from PIL import Image

from utils.data.augment_effects import Fog


def pick(values: tuple, severity: int):
    return values[severity - 1]


# Noise ---------------------------------------------------------------------------------------------

def gaussian_noise(image: torch.Tensor, severity: int) -> torch.Tensor:
    return image + torch.randn_like(image) * pick((0.08, 0.12, 0.18, 0.26, 0.38), severity)


def shot_noise(image: torch.Tensor, severity: int) -> torch.Tensor:
    photons = pick((60, 25, 12, 5, 3), severity)
    return torch.poisson(image * photons) / photons


def impulse_noise(image: torch.Tensor, severity: int) -> torch.Tensor:
    """Salt and pepper: this fraction of the values become 0 or 1, half each."""
    amount = pick((0.03, 0.06, 0.09, 0.17, 0.27), severity)
    draw = torch.rand_like(image)
    salted = torch.where(draw < amount / 2, torch.zeros_like(image), image)
    return torch.where((draw >= amount / 2) & (draw < amount), torch.ones_like(image), salted)


# Blur ----------------------------------------------------------------------------------------------

def disk_kernel(radius: int, alias_blur: float) -> torch.Tensor:
    """A flat disk of ``radius`` pixels, its edge softened by a gaussian of ``alias_blur`` (3 x 3;
    5 x 5 beyond 8 pixels, as ImageNet-C)."""
    size = 2 * max(8, radius) + 1
    axis = torch.arange(size, dtype=torch.float32) - size // 2
    disk = ((axis[:, None] ** 2 + axis[None, :] ** 2) <= radius ** 2).float()
    smoothing = (3, 3) if radius <= 8 else (5, 5)
    disk = kornia.filters.gaussian_blur2d(disk[None, None], smoothing, (alias_blur, alias_blur))[0, 0]
    return disk / disk.sum()


def defocus_blur(image: torch.Tensor, severity: int) -> torch.Tensor:
    radius, alias_blur = pick(((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)), severity)
    return kornia.filters.filter2d(image, disk_kernel(radius, alias_blur)[None], border_type="reflect")


def gaussian(image: torch.Tensor, sigma: float) -> torch.Tensor:
    size = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(image, (size, size), (sigma, sigma), border_type="reflect")


def glass_blur(image: torch.Tensor, severity: int) -> torch.Tensor:
    """Frosted glass: blurred, pixels moved by -delta..delta - 1 in each direction (ImageNet-C's
    range), ``rounds`` times, blurred again."""
    sigma, delta, rounds = pick(((0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2)), severity)
    image = gaussian(image, sigma)
    height, width = image.shape[-2:]
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for _ in range(rounds):
        moved_rows = (rows + torch.randint(-delta, delta, rows.shape)).clamp(0, height - 1)
        moved_columns = (columns + torch.randint(-delta, delta, columns.shape)).clamp(0, width - 1)
        image = image[..., moved_rows, moved_columns]
    return gaussian(image, sigma)


def motion_blur(image: torch.Tensor, severity: int) -> torch.Tensor:
    """A straight-line blur of 2 sigma + 1 pixels at a random angle within 45 degrees of horizontal."""
    sigma = pick((3, 5, 8, 12, 15), severity)
    angle = float(torch.empty(()).uniform_(-45, 45))
    return kornia.filters.motion_blur(image, 2 * sigma + 1, angle, 0.0)


def zoom(image: torch.Tensor, factor: float) -> torch.Tensor:
    """The middle of the image magnified by ``factor``, at the image's size."""
    height, width = image.shape[-2:]
    crop_height, crop_width = max(1, round(height / factor)), max(1, round(width / factor))
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    middle = image[..., top:top + crop_height, left:left + crop_width]
    return F.interpolate(middle, size=(height, width), mode="bilinear", align_corners=False)


def zoom_blur(image: torch.Tensor, severity: int) -> torch.Tensor:
    largest, step = pick(((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)), severity)
    factors = np.arange(1, largest, step)
    total = image.clone()
    for factor in factors:
        total += zoom(image, float(factor))
    return total / (len(factors) + 1)


# Weather -------------------------------------------------------------------------------------------

def plasma(image: torch.Tensor, roughness: float) -> torch.Tensor:
    """1 x 1 x H x W plasma fractal in [0, 1] (kornia's diamond-square)."""
    return diamond_square((1, 1, *image.shape[-2:]), roughness, normalize_range=(0.0, 1.0), dtype=image.dtype)


def fog(image: torch.Tensor, severity: int) -> torch.Tensor:
    """ImageNet-C's fog: a plasma fractal added, then the range scaled back; its ``wibbledecay``
    (how fast the fractal's octaves fade) is kornia's roughness inverted."""
    strength, decay = pick(((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)), severity)
    peak = image.max()
    return (image + strength * plasma(image, 1 / decay)) * peak / (peak + strength)


def frost(image: torch.Tensor, severity: int) -> torch.Tensor:
    """The image dimmed and a rough, pale blue-white ice texture laid over it."""
    keep, ice = pick(((1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)), severity)
    texture = plasma(image, 0.75) ** 2 * torch.tensor([0.85, 0.92, 1.0]).view(1, 3, 1, 1)
    return keep * image + ice * texture


def snow(image: torch.Tensor, severity: int) -> torch.Tensor:
    """ImageNet-C's snow: gaussian flakes, magnified, thresholded and streaked by a motion blur,
    falling on the image greyed towards white."""
    loc, scale, magnify, threshold, sigma, keep = pick(((0.1, 0.3, 3, 0.5, 4, 0.8), (0.2, 0.3, 2, 0.5, 4, 0.7),
                                                        (0.55, 0.3, 4, 0.9, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 8, 0.65),
                                                        (0.55, 0.3, 2.5, 0.85, 12, 0.55)), severity)
    flakes = zoom(torch.randn(1, 1, *image.shape[-2:]) * scale + loc, magnify)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)  # an 8-bit layer there
    flakes = kornia.filters.motion_blur(flakes, 2 * sigma + 1, float(torch.empty(()).uniform_(-135, -45)), 0.0)
    whitened = torch.maximum(image, kornia.color.rgb_to_grayscale(image) * 1.5 + 0.5)
    return keep * image + (1 - keep) * whitened + flakes + flakes.flip(-1, -2)


def brightness(image: torch.Tensor, severity: int) -> torch.Tensor:
    """HSV value raised by 0.1-0.5."""
    hsv = kornia.color.rgb_to_hsv(image)
    hsv[:, 2] = (hsv[:, 2] + pick((0.1, 0.2, 0.3, 0.4, 0.5), severity)).clamp(0, 1)
    return kornia.color.hsv_to_rgb(hsv)


# Digital -------------------------------------------------------------------------------------------

def contrast(image: torch.Tensor, severity: int) -> torch.Tensor:
    mean = image.mean(dim=(-2, -1), keepdim=True)
    return (image - mean) * pick((0.4, 0.3, 0.2, 0.1, 0.05), severity) + mean


def elastic_transform(image: torch.Tensor, severity: int) -> torch.Tensor:
    """A smooth random warp: displacements of up to 0.4-1.2 % of the image's long side drawn on a
    coarse grid (a point per 64 pixels) and spline-interpolated to every pixel."""
    height, width = image.shape[-2:]
    reach = pick((0.004, 0.006, 0.008, 0.010, 0.012), severity) * max(height, width)  # pixels
    coarse = torch.empty(1, 2, max(2, height // 64), max(2, width // 64)).uniform_(-reach, reach)
    shift = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0]
    rows = (torch.arange(height)[:, None] + shift[1]).clamp(0, height - 1) / (height - 1) * 2 - 1
    columns = (torch.arange(width)[None, :] + shift[0]).clamp(0, width - 1) / (width - 1) * 2 - 1
    grid = torch.stack([columns, rows], dim=-1)[None]
    return F.grid_sample(image, grid, mode="bilinear", align_corners=True)


def pixelate(image: torch.Tensor, severity: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    factor = pick((0.6, 0.5, 0.4, 0.3, 0.25), severity)
    small = F.interpolate(image, size=(max(1, round(height * factor)), max(1, round(width * factor))), mode="area")
    return F.interpolate(small, size=(height, width), mode="nearest")


def jpeg_compression(image: torch.Tensor, severity: int) -> torch.Tensor:
    pixels = (image[0].permute(1, 2, 0) * 255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=pick((25, 18, 15, 10, 7), severity))
    decoded = np.asarray(Image.open(buffer).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1)[None].float() / 255


# Our weather preset --------------------------------------------------------------------------------

def weather_fog(image: torch.Tensor, severity: int) -> torch.Tensor:
    density = pick((0.15, 0.3, 0.45, 0.6, 0.75), severity)
    return Fog(density=(density, density))(image)


def weather_flare(image: torch.Tensor, severity: int) -> torch.Tensor:
    gain = pick((0.1, 0.2, 0.3, 0.4, 0.5), severity)
    return K.RandomGaussianIllumination(gain=(gain, gain), sign=(1.0, 1.0), p=1.0)(image)


def weather_rain(image: torch.Tensor, severity: int) -> torch.Tensor:
    """Drops as dense on any image size: one per 4000 (severity 1) to 400 pixels (5)."""
    drops = image.shape[-2] * image.shape[-1] // pick((4000, 2000, 1000, 600, 400), severity)
    return K.RandomRain(number_of_drops=(drops, drops + 1), drop_height=(5, 15), drop_width=(-3, 3), p=1.0)(image)


def weather_shadow(image: torch.Tensor, severity: int) -> torch.Tensor:
    shade = -pick((0.2, 0.35, 0.5, 0.65, 0.8), severity)
    return K.RandomPlasmaShadow(roughness=(0.3, 0.3), shade_intensity=(shade, shade), p=1.0)(image)
