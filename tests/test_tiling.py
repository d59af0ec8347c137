"""Sliding-window inference and test-time augmentation (utils/inference/tiling.py) through the
Predictor: equal to whole where they must be, seamless, bounded in memory, validated."""
from __future__ import annotations

import os
import subprocess
import sys
import weakref

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
from utils.inference.tiling import (
    Strategy,
    StrategyError,
    network_probabilities,
    slide,
    smooth_window,
    tile_starts,
    top_of,
)

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


def coordinates(height: int, width: int) -> np.ndarray:
    """An image whose pixels spell their own (row, column), so that a tile knows where it lies."""
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack([rows % 256, columns % 256, rows // 256 * 16 + columns // 256], axis=-1).astype(np.uint8)


def tile_outputs(tile: np.ndarray) -> torch.Tensor:
    """h x w x 3 random 'probabilities' of their own for every tile (seeded by where it starts)."""
    low_row, low_column, high = (int(value) for value in tile[0, 0])
    top, left = low_row + 256 * (high // 16), low_column + 256 * (high % 16)
    return torch.rand(*tile.shape[:2], 3, generator=torch.Generator().manual_seed(top * 10_007 + left))


def blended_by_hand(pixels: np.ndarray, tile: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blend as the definition says, on whole-image arrays: sum of window x output over
    tiles, divided by the summed windows."""
    height, width = pixels.shape[:2]
    sums, weights = torch.zeros(height, width, 3), torch.zeros(height, width)
    for y in tile_starts(height, tile, stride):
        for x in tile_starts(width, tile, stride):
            window = smooth_window(min(tile, height - y), min(tile, width - x))
            sums[y:y + tile, x:x + tile] += tile_outputs(pixels[y:y + tile, x:x + tile]) * window[..., None]
            weights[y:y + tile, x:x + tile] += window
    confidence, class_ids = (sums / weights[..., None]).max(dim=-1)
    return class_ids.to(torch.int32), confidence


def test_tile_starts_cover_every_pixel_and_the_window_never_reaches_zero():
    assert tile_starts(100, 64, 42) == [0, 36]
    assert tile_starts(40, 64, 42) == [0]
    assert tile_starts(200, 64, 42) == [0, 42, 84, 126, 136]
    window = smooth_window(64, 48)
    assert window.min() > 0 and window.max() <= 1


@pytest.mark.parametrize("budget_bytes", [1, None], ids=["strips-one-tile-wide", "one-strip"])
def test_the_blend_is_the_window_weighted_mean_of_every_tile_covering_a_pixel(budget_bytes):
    pixels = coordinates(150, 300)
    class_ids, confidence = slide(pixels, tile_outputs, (64, 64), (40, 40), num_classes=3, budget_bytes=budget_bytes)
    expected_ids, expected_confidence = blended_by_hand(pixels, 64, 40)
    assert torch.equal(class_ids, expected_ids)
    torch.testing.assert_close(confidence, expected_confidence)


def test_a_blended_tile_is_let_go_before_the_next_tile_is_computed():
    """A tile's C x h x w probabilities held through the next forward cost the default model's
    4000 x 3000 slide 150 MB of its peak."""
    returned = []

    def probabilities(tile: np.ndarray) -> torch.Tensor:
        assert all(ref() is None for ref in returned), "an earlier tile's probabilities are still held"
        output = tile_outputs(tile)
        returned.append(weakref.ref(output))
        return output

    slide(coordinates(150, 300), probabilities, (64, 64), (40, 40), num_classes=3)
    assert len(returned) == len(tile_starts(150, 64, 40)) * len(tile_starts(300, 64, 40))  # one strip


def test_the_class_is_the_larger_sum_where_both_divide_to_the_same_probability():
    sums = torch.tensor([[[0.94822234, 0.94822240]]])
    weights = torch.tensor([[1.7208325]])
    probabilities = sums / weights[..., None]
    assert probabilities[0, 0, 0] == probabilities[0, 0, 1]  # the near-tie
    class_ids, confidence = top_of((sums, weights))
    assert class_ids.tolist() == [[1]] and class_ids.dtype == torch.int32
    assert confidence[0, 0] == probabilities.max()


def test_an_empty_image_slides_to_empty_maps():
    class_ids, confidence = slide(np.zeros((0, 50, 3), np.uint8), lambda tile: torch.zeros(*tile.shape[:2], 3),
                                  (64, 64), (40, 40), num_classes=3)
    assert class_ids.shape == confidence.shape == (0, 50)


def test_the_forwards_a_service_bounds_are_the_forwards_slide_runs(monkeypatch):
    monkeypatch.setattr(tiling, "SLIDE_BUDGET_BYTES", 4 * 3 * 64 * 100)  # strips of 100 pixels for 3 classes
    predictor = pointwise(3)
    calls = []
    network = predictor.forward
    predictor.forward = lambda batch: calls.append(1) or network(batch)
    for strategy in (Strategy(mode="slide", tile=64, stride=40, tta="flip"), Strategy(mode="slide", tile=48),
                     Strategy(tta="flip+scales")):
        calls.clear()
        predictor.predict(noise(300, 170), strategy)
        assert len(calls) == strategy.forwards((170, 300), predictor.input_size, 3), strategy


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


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_probabilities_are_the_softmax_of_the_logits_bit_for_bit(memory_format):
    """In place, over channels_last logits and over NCHW ones (as ONNX Runtime returns them): the
    numbers of a softmax into a new tensor."""
    logits = torch.randn(1, 7, 32, 48, generator=torch.Generator().manual_seed(0))
    logits = logits.contiguous(memory_format=memory_format)
    expected = torch.softmax(logits.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)
    probabilities = network_probabilities(lambda batch: logits.clone(memory_format=memory_format),
                                          torch.zeros(1, 3, 32, 48), minimum=1, fill=0.0)
    assert torch.equal(probabilities, expected)


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
    ({"mode": "slide", "tile": 0}, "tile must be 16..8192"),
    ({"mode": "slide", "stride": 4}, "stride must be 8..8192"),
    ({"mode": "slide", "scale": 9.0}, "scale must be within"),
    ({"mode": "slide", "tile": 32, "stride": 40}, "would leave pixels unseen"),
])
def test_a_strategy_that_cannot_be_applied_is_refused_in_one_line(arguments, message):
    with pytest.raises(StrategyError, match=message):
        Strategy(**arguments)


def test_a_stride_beyond_the_checkpoints_own_tile_is_refused():
    with pytest.raises(StrategyError, match="stride 100 > tile 64"):
        pointwise().predict(noise(90, 70), Strategy(mode="slide", stride=100))
