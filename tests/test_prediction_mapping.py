"""Predictions mapped back to the image: crop of the padding, nearest resize and the chunked
softmax, each against the same steps computed independently here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from model import build_model, model_meta
from utils.checkpoint import save_checkpoint
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from utils.inference import predictor as predictor_module
from utils.inference.predictor import PIXELS_PER_CHUNK, Predictor, top_class_and_confidence

CLASS_NAMES = [f"class{i}" for i in range(5)]
# Long side 80: a 53x37 photo becomes 80x56, padded to 80x64 = 5120 network pixels, more than
# one softmax chunk, so the end-to-end test below also sees a second chunk.
INPUT_LONG_SIDE = 80


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    torch.manual_seed(0)
    arch_args = {"num_classes": len(CLASS_NAMES), "base_width": 4, "bilinear": True}
    network = build_model("unet", **arch_args)
    # A fresh U-Net's logits are its class biases plus a ripple: one class everywhere.  Without the
    # biases and with the ripple amplified, the class map has structure a misplaced crop changes.
    with torch.no_grad():
        network.outc.bias.zero_()
        network.outc.weight.mul_(100)
    meta = model_meta("unet", arch_args, CLASS_NAMES, [INPUT_LONG_SIDE] * 2, IMAGENET_MEAN, IMAGENET_STD)
    path = tmp_path_factory.mktemp("mapping") / "tiny.pth"
    save_checkpoint(path, {"model": network.state_dict(), "meta": meta})
    return Predictor.from_checkpoint(path, device="cpu", precision="fp32")


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def nearest_indices(source: int, target: int) -> np.ndarray:
    """For each of ``target`` output pixels, the source pixel whose span holds its centre."""
    return np.floor((np.arange(target) + 0.5) * source / target).astype(int)


def network_maps(predictor: Predictor, image: Image.Image) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(class ids, confidences) of the network on the resized, bottom/right zero-padded image,
    over the whole padded input; and the resized (height, width)."""
    width, height = image.size
    scale = INPUT_LONG_SIDE / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(image.resize((new_width, new_height), Image.Resampling.BILINEAR))
    padded = np.zeros((math.ceil(new_height / 16) * 16, math.ceil(new_width / 16) * 16, 3), np.uint8)
    padded[:new_height, :new_width] = resized
    with torch.no_grad():
        probabilities = predictor.model(to_tensor(padded)[None]).double().softmax(dim=1)[0]
    confidence, class_ids = probabilities.max(dim=0)
    return class_ids.numpy(), confidence.float().numpy(), new_height, new_width


@pytest.mark.parametrize("width, height", [(53, 37), (37, 53), (150, 91)])
def test_prediction_is_the_network_output_cropped_to_the_image_and_resized_nearest(predictor, width, height):
    image = noise_image(width, height, seed=width)
    class_ids, confidence, new_height, new_width = network_maps(predictor, image)
    assert class_ids.shape != (new_height, new_width)  # the image really was padded
    rows, cols = nearest_indices(new_height, height), nearest_indices(new_width, width)
    expected_classes = class_ids[:new_height, :new_width][np.ix_(rows, cols)]
    expected_confidence = confidence[:new_height, :new_width][np.ix_(rows, cols)]
    # Guard: a crop from the other side of the padding would give another answer.
    assert not np.array_equal(class_ids[-new_height:, -new_width:][np.ix_(rows, cols)], expected_classes)
    assert len(np.unique(expected_classes)) > 1

    prediction = predictor.predict(image)

    np.testing.assert_array_equal(prediction.class_map, expected_classes)
    np.testing.assert_allclose(prediction.confidence, expected_confidence, rtol=1e-5)


def plain_top_class(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax and top softmax probability of C x H x W logits in one unchunked step (float64)."""
    confidence, class_ids = logits.double().softmax(dim=0).max(dim=0)
    return class_ids, confidence.float()


@pytest.mark.parametrize("chunk", [PIXELS_PER_CHUNK, 7, 1000])
@pytest.mark.parametrize("channels_last", [False, True])
def test_top_class_and_confidence_equals_a_plain_softmax_over_every_chunk(monkeypatch, chunk, channels_last):
    monkeypatch.setattr(predictor_module, "PIXELS_PER_CHUNK", chunk)
    height, width = 67, 71  # 4757 pixels: more than one real chunk, and no multiple of any chunk above
    assert height * width > PIXELS_PER_CHUNK and (height * width) % chunk
    logits = 4 * torch.randn(1, 6, height, width, generator=torch.Generator().manual_seed(chunk))
    if channels_last:  # the layout the network hands over
        logits = logits.contiguous(memory_format=torch.channels_last)

    class_ids, confidence = top_class_and_confidence(logits[0])

    expected_ids, expected_confidence = plain_top_class(logits[0])
    assert torch.equal(class_ids, expected_ids)
    torch.testing.assert_close(confidence, expected_confidence, rtol=1e-6, atol=1e-7)
