"""Sliding-window inference and test-time augmentation (utils/inference/tiling.py) through the
Predictor: equal to whole where they must be, seamless, bounded in memory, validated."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model import model_meta
from tests.conftest import ROOT
from tests.tiny_checkpoint import make_checkpoint
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils.inference import tiling
from utils.inference.predictor import Predictor
from utils.inference.tiling import Strategy, StrategyError, slide, smooth_window, tile_starts

TRAINING_SIZE = [64, 64]


def predictor_of(network: nn.Module, num_classes: int) -> Predictor:
    meta = model_meta("unet", {"num_classes": num_classes}, [f"c{i}" for i in range(num_classes)], TRAINING_SIZE,
                      IMAGENET_MEAN, IMAGENET_STD)
    return Predictor(network, meta, torch.device("cpu"))


def pointwise(num_classes: int = 5) -> Predictor:
    """A 1x1 convolution: each pixel's logits depend on that pixel alone (translation-equivariant)."""
    torch.manual_seed(0)
    return predictor_of(nn.Conv2d(3, num_classes, 1), num_classes)


class Blur(nn.Module):
    """A 5x5 box filter with zero padding, then 1x1 to classes: a tile's borders see its padding."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.blur = nn.Conv2d(3, 3, 5, padding=2, bias=False)
        nn.init.constant_(self.blur.weight, 1 / 25)
        self.classes = nn.Conv2d(3, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classes(self.blur(images))


class Mirrored(nn.Module):
    """Left-right symmetric by construction: the network's output on x and on flip(x), averaged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.inner(images) + self.inner(images.flip(-1)).flip(-1)) / 2


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Predictor:
    return Predictor.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("t") / "tiny.pth", varied=True),
                                     device="cpu", precision="fp32")


def test_slide_on_an_image_that_fits_in_one_tile_equals_whole(tiny):
    image = noise(64, 40)  # long side 64, the training size: whole does not rescale it either
    whole, slid = tiny.predict(image), tiny.predict(image, Strategy(mode="slide"))
    np.testing.assert_array_equal(slid.class_map, whole.class_map)
    np.testing.assert_allclose(slid.confidence, whole.confidence, rtol=1e-5)


def test_slide_equals_whole_everywhere_on_a_translation_equivariant_network():
    predictor = pointwise()
    image = noise(64, 48, seed=1)
    whole = predictor.predict(image)
    for strategy in (Strategy(mode="slide", tile=24, stride=10), Strategy(mode="slide", tile=32)):
        slid = predictor.predict(image, strategy)
        np.testing.assert_array_equal(slid.class_map, whole.class_map)
        np.testing.assert_allclose(slid.confidence, whole.confidence, rtol=1e-5)


def test_slide_at_a_scale_answers_at_the_original_size(tiny):
    result = tiny.predict(noise(150, 90), Strategy(mode="slide", scale=0.5))
    assert result.class_map.shape == result.confidence.shape == (90, 150)


def test_tiles_cover_every_pixel_and_the_blend_weights_sum_to_one():
    assert tile_starts(100, 64, 42) == [0, 36]
    assert tile_starts(40, 64, 42) == [0]
    assert tile_starts(200, 64, 42) == [0, 42, 84, 126, 136]
    window = smooth_window(64, 48)
    assert window.min() > 0 and window.max() <= 1
    # Probabilities of 1 for class 0 everywhere: the blend gives back exactly 1 where the weights sum to one.
    ones = np.zeros((130, 170, 3), np.uint8)
    class_ids, confidence = slide(ones, lambda tile: torch.tensor([1.0, 0.0]).expand(*tile.shape[:2], 2),
                                  (64, 64), (42, 42), num_classes=2, budget_bytes=1)  # budget 1: strips one tile wide
    assert (class_ids == 0).all()
    torch.testing.assert_close(confidence, torch.ones(130, 170))


def test_tile_borders_leave_no_seam_on_a_constant_image(monkeypatch):
    torch.manual_seed(0)
    predictor = predictor_of(Blur(), 4)
    image = Image.new("RGB", (160, 120), (90, 140, 200))

    def seam() -> float:
        confidence = predictor.predict(image, Strategy(mode="slide", tile=48)).confidence
        return float(np.ptp(confidence[4:-4, 4:-4]))  # the image's own borders see zero padding, as whole does

    smooth = seam()
    monkeypatch.setattr(tiling, "smooth_window", lambda height, width: torch.ones(height, width))
    flat = seam()  # each tile's padded border counts fully: a grid of lines
    assert smooth < 0.01 and smooth < flat / 20


LARGE_SLIDE = """
import resource, sys
import numpy as np, torch
from PIL import Image
sys.path.insert(0, sys.argv[1])
from tests.test_tiling import pointwise
from utils.inference import tiling
from utils.inference.tiling import Strategy
tiling.SLIDE_BUDGET_BYTES = 48 * 2**20
predictor, strategy = pointwise(91), Strategy(mode="slide", tile=384)
predictor.predict(Image.new("RGB", (500, 400)), strategy)  # the allocator's pools for one tile
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = predictor.predict(Image.fromarray(np.full((1500, 2000, 3), 127, np.uint8)), strategy)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert result.class_map.shape == (1500, 2000)
print((after - before) * 1024)
"""


def test_a_large_image_slides_without_its_c_h_w_probabilities():
    """2000 x 1500, 91 classes: the whole image's probabilities would be 1.1 GB; the slide holds a
    strip of one band (48 MB here) beside H x W maps.  Peak RSS in a process of its own."""
    result = subprocess.run([sys.executable, "-c", LARGE_SLIDE, str(ROOT)], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    grown = int(result.stdout.split()[-1])
    whole_probabilities = 91 * 2000 * 1500 * 4
    assert grown < 300 * 2**20 < whole_probabilities / 3


def test_flip_tta_on_a_left_right_symmetric_network_is_the_plain_result():
    torch.manual_seed(1)
    predictor = predictor_of(Mirrored(Blur()), 4)
    image = noise(64, 48, seed=2)
    plain, flipped = predictor.predict(image), predictor.predict(image, Strategy(tta="flip"))
    np.testing.assert_array_equal(flipped.class_map, plain.class_map)
    np.testing.assert_allclose(flipped.confidence, plain.confidence, rtol=1e-5)


def test_flip_tta_differs_on_a_network_that_is_not_symmetric():
    torch.manual_seed(1)
    predictor = predictor_of(nn.Conv2d(3, 4, (1, 7), padding=(0, 3)), 4)
    image = noise(64, 48, seed=2)
    plain, flipped = predictor.predict(image), predictor.predict(image, Strategy(tta="flip"))
    assert not np.allclose(flipped.confidence, plain.confidence)


@pytest.mark.parametrize("strategy", [Strategy(tta="scales"), Strategy(tta="flip+scales"),
                                      Strategy(mode="slide", tile=32, tta="flip+scales")])
def test_scales_restore_the_original_size(tiny, strategy):
    result = tiny.predict(noise(53, 37), strategy)
    assert result.class_map.shape == result.confidence.shape == (37, 53)
    assert ((result.confidence > 0) & (result.confidence <= 1 + 1e-6)).all()


def test_scales_on_a_pointwise_network_average_views_that_barely_differ():
    # Bilinear resizing of a smooth image changes little, so the averaged views agree with one view.
    predictor = pointwise()
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(ramp, (48, 1))] * 3, axis=-1))
    plain, scaled = predictor.predict(image), predictor.predict(image, Strategy(tta="scales"))
    assert (plain.class_map == scaled.class_map).mean() > 0.95


@pytest.mark.parametrize("arguments, message", [
    ({"mode": "tiles"}, "mode must be one of whole, slide"),
    ({"tta": "rotate"}, "tta must be one of"),
    ({"tile": 64}, "only in slide mode"),
    ({"mode": "slide", "tile": 0}, "tile must be 1..8192"),
    ({"mode": "slide", "scale": 9.0}, "scale must be within"),
    ({"mode": "slide", "tile": 32, "stride": 40}, "would leave pixels unseen"),
])
def test_a_strategy_that_cannot_be_applied_is_refused_in_one_line(arguments, message):
    with pytest.raises(StrategyError, match=message):
        Strategy(**arguments)
