"""Joint transforms keep image and mask aligned, invent no labels and pad correctly."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from utils.classes import palette
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform

COLOURS = palette(8).astype(np.int64)


def blocky_pair(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mask of large blocks of classes 0..7 (and some ignore) and an image coloured by class."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 8, size=(height // 16 + 1, width // 16 + 1))
    mask = np.kron(coarse, np.ones((16, 16), np.int64))[:height, :width].astype(np.uint8)
    mask[:4, :4] = 255
    image = palette(8)[np.minimum(mask, 7)]
    return image, mask


def denormalise(tensor: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((tensor * std + mean) * 255).permute(1, 2, 0).round().numpy()


def colour_class(image: np.ndarray) -> np.ndarray:
    """For each pixel, the class whose colour is nearest."""
    return np.abs(image[:, :, None, :] - COLOURS[None, None]).sum(-1).argmin(-1)


def interior(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 5x5 neighbourhood has a single label."""
    padded = np.pad(labels, 2, mode="edge")
    height, width = labels.shape
    same = np.ones(labels.shape, bool)
    for dy in range(5):
        for dx in range(5):
            same &= padded[dy:dy + height, dx:dx + width] == labels
    return same


@pytest.mark.parametrize("seed", range(5))
def test_train_transform_keeps_alignment_and_labels(seed):
    image, mask = blocky_pair(150, 210, seed)
    out_image, out_mask = TrainTransform(crop_size=96)(image, mask, random.Random(seed))
    assert out_image.shape == (3, 96, 96) and out_image.dtype == torch.float32
    assert out_mask.shape == (96, 96) and out_mask.dtype == torch.int64
    labels = out_mask.numpy()
    assert set(np.unique(labels)) <= set(np.unique(mask)) | {255}
    valid = interior(labels) & (labels != 255)  # bilinear resizing blurs the block edges
    agreement = (colour_class(denormalise(out_image))[valid] == labels[valid]).mean()
    assert valid.mean() > 0.3 and agreement > 0.99


def test_flip_mirrors_image_and_mask_together():
    image, mask = blocky_pair(64, 64)
    transform = TrainTransform(crop_size=64, scale_range=(1.0, 1.0), flip_probability=1.0)
    out_image, out_mask = transform(image, mask, random.Random(0))
    np.testing.assert_array_equal(out_mask.numpy(), mask[:, ::-1])
    np.testing.assert_allclose(denormalise(out_image), image[:, ::-1], atol=1)


def test_small_image_is_padded_with_zero_and_ignore():
    image, mask = blocky_pair(40, 30)
    transform = TrainTransform(crop_size=64, scale_range=(1.0, 1.0), flip_probability=0.0)
    out_image, out_mask = transform(image, mask, random.Random(0))
    labels = out_mask.numpy()
    np.testing.assert_array_equal(labels[:40, :30], mask)
    assert (labels[40:] == 255).all() and (labels[:, 30:] == 255).all()
    assert np.abs(denormalise(out_image)[40:]).max() < 1  # black, before normalisation


def test_eval_transform_pads_to_multiple_of_16_and_keeps_the_image():
    image, mask = blocky_pair(37, 53)
    out_image, out_mask = EvalTransform()(image, mask)
    assert out_image.shape == (3, 48, 64) and out_mask.shape == (48, 64)
    np.testing.assert_array_equal(out_mask[:37, :53].numpy(), mask)
    assert (out_mask[37:] == 255).all() and (out_mask[:, 53:] == 255).all()
    np.testing.assert_allclose(denormalise(out_image)[:37, :53], image, atol=1)


def test_eval_transform_pads_a_thin_image_to_the_models_minimum():
    image, mask = blocky_pair(12, 53)  # the multiple of 16 alone would pad it to 16
    out_image, out_mask = EvalTransform(minimum=32)(image, mask)
    assert out_image.shape == (3, 32, 64)
    np.testing.assert_array_equal(out_mask[:12, :53].numpy(), mask)
    assert (out_mask[12:] == 255).all()
