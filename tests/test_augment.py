"""Augmentation presets: geometry moves image and mask together, photometric and weather effects
never touch the mask, no label is invented, a seed fixes the sample, and basic is unchanged."""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

import train
from tests.conftest import ROOT
from tests.test_transforms import blocky_pair, denormalise, interior
from utils.data.augment import PRESETS, augmentation, train_transform
from utils.data.augment_effects import GridDistortion, moving_geometry
from utils.training.state import plain_config

CROP = 96
SEEDS = range(6)
# TrainTransform(crop_size=96) on blocky_pair(150, 210, 3) with random.Random(seed), before presets existed.
BASIC_DIGESTS = ["70cc6757db50c292d1308cd43a6328b6910868d06234aa49140ae382fdfc1e10",
                 "19e7595419314b393f57613ed925bfd20faff1fc893ca2d4b5e107a4e4d92405",
                 "39a0ccd02183e81c7adbe9a43e1ae100d7aa852b5a7de2adc4a028f16d21842e"]


def red_blue_pair(height: int = 120, width: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """12-pixel blocks of class 1 (red) and class 0 (blue), a green ignore corner.  Colour, light,
    camera and weather effects keep red redder than blue, so the image still says the class."""
    coarse = np.random.default_rng(0).integers(0, 2, size=(height // 12 + 1, width // 12 + 1))
    mask = np.kron(coarse, np.ones((12, 12), np.int64))[:height, :width].astype(np.uint8)
    mask[:20, :20] = 255
    colours = np.zeros((256, 3), np.uint8)
    colours[0], colours[1], colours[255] = (0, 0, 220), (220, 0, 0), (0, 200, 0)
    return colours[mask], mask


def sample(preset: str, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return train_transform(preset, CROP)(image, mask, random.Random(seed))


def test_basic_gives_the_samples_it_always_gave():
    image, mask = blocky_pair(150, 210, 3)
    for seed, digest in enumerate(BASIC_DIGESTS):
        out_image, out_mask = sample("basic", image, mask, seed)
        assert hashlib.sha256(out_image.numpy().tobytes() + out_mask.numpy().tobytes()).hexdigest() == digest


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_a_drawn_shape_aligned_with_its_mask(preset):
    image, mask = red_blue_pair()
    for seed in SEEDS:
        out_image, out_mask = sample(preset, image, mask, seed)
        rgb, labels = denormalise(out_image), out_mask.numpy()
        valid = interior(labels) & (labels != 255)  # resampling and JPEG blur the block edges
        agreement = ((rgb[..., 0] > rgb[..., 2]) == (labels == 1))[valid].mean()
        assert valid.mean() > 0.3 and agreement > 0.97, (seed, agreement)


def test_strong_does_move_the_masks_that_the_alignment_test_checks():
    image, mask = red_blue_pair()
    moved = [not torch.equal(sample("strong", image, mask, seed)[1], sample("basic", image, mask, seed)[1])
             for seed in SEEDS]
    assert sum(moved) >= 2, moved


def test_grid_distortion_moves_image_and_mask_together_and_keeps_the_edges():
    image, mask = red_blue_pair(96, 96)
    torch.manual_seed(0)
    out_image, out_mask = GridDistortion(limit=0.3)(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                                                    tv_tensors.Mask(torch.from_numpy(mask)))
    labels, rgb = out_mask.numpy(), out_image.permute(1, 2, 0).numpy()
    assert out_image.dtype == torch.uint8 and out_mask.dtype == torch.uint8
    assert (labels != mask).mean() > 0.02  # the grid did move
    assert set(np.unique(labels).tolist()) <= set(np.unique(mask).tolist())  # nearest: no invented ids
    valid = interior(labels) & (labels != 255)
    assert ((rgb[..., 0] > rgb[..., 2]) == (labels == 1))[valid].mean() > 0.97
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:  # the edges stay where they were
        assert labels[corner] == mask[corner] and (rgb[corner] == image[corner]).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_masks_hold_only_the_class_ids_and_ignore(preset):
    image, mask = blocky_pair(150, 210, 1)
    for seed in SEEDS:
        out_image, out_mask = sample(preset, image, mask, seed)
        assert out_mask.dtype == torch.int64 and out_mask.shape == (CROP, CROP)
        assert out_image.dtype == torch.float32 and out_image.shape == (3, CROP, CROP)
        assert set(out_mask.unique().tolist()) <= set(np.unique(mask).tolist()) | {255}


@pytest.mark.parametrize("preset", ["photometric", "weather"])
def test_photometric_presets_leave_the_mask_byte_identical(preset):
    image, mask = red_blue_pair()
    images_differ = []
    for seed in SEEDS:
        basic_image, basic_mask = sample("basic", image, mask, seed)
        out_image, out_mask = sample(preset, image, mask, seed)
        assert torch.equal(out_mask, basic_mask)
        images_differ.append(not torch.allclose(out_image, basic_image))
    assert sum(images_differ) >= len(SEEDS) // 2  # the preset does change the pictures


def test_uncovered_pixels_become_ignore_and_ignore_stays_ignore():
    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    mask = torch.ones(64, 64, dtype=torch.uint8)
    mask[:16] = 255
    geometry = moving_geometry()
    moved = 0
    for seed in SEEDS:
        torch.manual_seed(seed)
        out_image, out_mask = geometry(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert set(out_mask.unique().tolist()) <= {1, 255}
        uncovered = (out_image == 0).all(0)
        assert (out_mask[uncovered] == 255).all()
        moved += bool(uncovered.any())
    assert moved  # some seeds did rotate or shift the crop
    # The ignore band keeps its size up to what the warp moves in or out.
    assert abs((out_mask == 255).float().mean().item() - (mask == 255).float().mean().item()) < 0.15


@pytest.mark.parametrize("preset", PRESETS)
def test_a_fixed_seed_gives_the_same_sample_twice(preset):
    image, mask = blocky_pair(150, 210, 2)
    first, again, other = (sample(preset, image, mask, seed) for seed in (7, 7, 8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_the_seeded_sample_leaves_torchs_own_generator_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    image, mask = blocky_pair(150, 210, 2)
    sample("strong", image, mask, 0)
    assert torch.equal(torch.rand(3), expected)


def test_an_unknown_preset_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'; known presets: basic, photometric"):
        augmentation("heavy", CROP)


def test_the_preset_is_a_training_argument_kept_in_the_checkpoint():
    assert train.parse_args([]).augment == "basic"
    assert plain_config(train.parse_args(["--augment", "weather"]))["augment"] == "weather"


def test_train_py_starts_without_kornia_or_torchvision_until_a_preset_or_a_model_needs_them():
    """They take ~4 s of every train.py start (each torchrun rank's too); the basic preset on our own
    U-Net needs neither, and a preset that does still gets them."""
    code = ("import sys; sys.argv = ['train.py']; import train; from utils.data.augment import train_transform; "
            "loaded = lambda: sorted({'kornia', 'torchvision'} & set(sys.modules)); "
            "train_transform('basic', 64); print(loaded()); train_transform('weather', 64); print(loaded())")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["[]", "['kornia', 'torchvision']"]
