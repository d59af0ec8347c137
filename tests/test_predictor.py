"""The inference path on a tiny saved checkpoint: sizes, image modes, EXIF, summaries, overlays."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from model import build_model, load_model, model_meta
from tests.tiny_checkpoint import make_checkpoint
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.classes import palette
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from utils.drawing import render_overlay
from utils.inference import predictor as predictor_module
from utils.inference.predictor import Prediction, Predictor, choose_precision, pick_device
from utils.inference.summary import summarize

NUM_CLASSES = 6
INPUT_SIZE = (32, 48)  # long side 48: the network sees at most 48 pixels a side
CLASS_NAMES = [f"class{i}" for i in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    torch.manual_seed(0)
    arch_args = {"num_classes": NUM_CLASSES, "base_width": 4, "bilinear": True}
    model = build_model("unet", **arch_args)
    meta = model_meta("unet", arch_args, CLASS_NAMES, INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pth"
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta})
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint_path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint_path, device="cpu")


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def assert_valid(prediction: Prediction, height: int, width: int, num_classes: int = NUM_CLASSES) -> None:
    assert prediction.class_map.shape == (height, width)
    assert prediction.confidence.shape == (height, width)
    assert prediction.class_map.dtype == np.uint8
    assert prediction.confidence.dtype == np.float32
    assert prediction.class_map.max() < num_classes
    assert (prediction.confidence > 0).all() and (prediction.confidence <= 1).all()
    # Never below the uniform probability: it is the largest of num_classes softmax values.
    assert prediction.confidence.min() >= 1 / num_classes - 1e-6
    assert prediction.inference_ms > 0


def test_predictor_exposes_the_checkpoint_description(predictor):
    assert predictor.class_names == CLASS_NAMES
    assert predictor.num_classes == NUM_CLASSES
    assert predictor.input_size == INPUT_SIZE
    assert predictor.device == torch.device("cpu")
    assert not predictor.model.training


def test_pick_device_honours_a_preference_and_defaults_to_cuda_when_present():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_threads_option_sets_torch_threads(checkpoint_path):
    before = torch.get_num_threads()
    try:
        Predictor.from_checkpoint(checkpoint_path, device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("width, height", [(53, 37), (37, 53), (1, 1), (200, 5), (97, 101)])
def test_prediction_has_the_original_size(predictor, width, height):
    assert_valid(predictor.predict(noise_image(width, height)), height, width)


def test_preprocess_scales_the_long_side_and_pads_with_black_to_a_multiple_of_16(predictor):
    batch, info = predictor.preprocess(noise_image(53, 37))
    assert info.original_size == (37, 53)
    assert info.resized_size == (34, 48)  # 37 * 48 / 53 = 33.5
    assert batch.shape == (1, 3, 48, 48)
    black = (-np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)).astype(np.float32)
    np.testing.assert_allclose(batch[0, :, 34:, :].amin(dim=(1, 2)).numpy(), black, rtol=1e-6)
    np.testing.assert_allclose(batch[0, :, 34:, :].amax(dim=(1, 2)).numpy(), black, rtol=1e-6)


def test_prediction_is_argmax_and_top_softmax_of_the_network(predictor):
    # 48x32 is the network's own size and a multiple of 16: no resizing, no padding.
    image = noise_image(48, 32)
    prediction = predictor.predict(image)
    with torch.no_grad():
        probabilities = predictor.model(to_tensor(np.asarray(image))[None]).softmax(dim=1)[0]
    np.testing.assert_array_equal(prediction.class_map, probabilities.argmax(dim=0).numpy())
    np.testing.assert_allclose(prediction.confidence, probabilities.amax(dim=0).numpy(), rtol=1e-5)


def test_class_map_is_upsampled_by_nearest_neighbour(predictor):
    # Twice the network size: each network pixel becomes one 2x2 block of the answer.
    prediction = predictor.predict(noise_image(96, 64))
    for block in (prediction.class_map, prediction.confidence):
        for row, col in ((0, 1), (1, 0), (1, 1)):
            np.testing.assert_array_equal(block[row::2, col::2], block[::2, ::2])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16"])
def test_any_image_mode_is_accepted(predictor, mode):
    if mode == "I;16":
        image = Image.fromarray(np.arange(31 * 45, dtype=np.uint16).reshape(31, 45) * 40)
        assert image.mode == "I;16"
    else:
        image = noise_image(45, 31).convert(mode)
    assert_valid(predictor.predict(image), 31, 45)


def test_exif_rotated_jpeg_is_predicted_upright(predictor):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    noise_image(40, 24).save(buffer, format="JPEG", exif=exif)
    stored = Image.open(io.BytesIO(buffer.getvalue()))

    prediction = predictor.predict(stored)

    assert_valid(prediction, 40, 24)
    upright = predictor.predict(ImageOps.exif_transpose(stored))
    np.testing.assert_array_equal(prediction.class_map, upright.class_map)


def test_summary_of_a_real_prediction_agrees_with_a_direct_count(predictor):
    prediction = predictor.predict(noise_image(61, 43, seed=3))
    summary = summarize(prediction, CLASS_NAMES)

    assert sum(entry["area"] for entry in summary) == 61 * 43
    assert [entry["area"] for entry in summary] == sorted((entry["area"] for entry in summary), reverse=True)
    present = np.unique(prediction.class_map)
    assert sorted(entry["id"] for entry in summary) == present.tolist()
    for entry in summary:
        pixels = prediction.class_map == entry["id"]
        assert entry["name"] == CLASS_NAMES[entry["id"]]
        assert entry["area"] == pixels.sum()
        assert entry["area_ratio"] == pytest.approx(pixels.mean())
        assert entry["mean_confidence"] == pytest.approx(prediction.confidence[pixels].mean(), rel=1e-5)


def test_summary_of_a_known_prediction():
    class_map = np.array([[0, 0, 2], [2, 2, 5]], dtype=np.uint8)
    confidence = np.array([[0.5, 0.7, 0.9], [0.6, 0.3, 1.0]], dtype=np.float32)
    summary = summarize(Prediction(class_map, confidence, 1.0), CLASS_NAMES)
    assert [(e["id"], e["name"], e["area"]) for e in summary] == [(2, "class2", 3), (0, "class0", 2), (5, "class5", 1)]
    assert [e["area_ratio"] for e in summary] == pytest.approx([0.5, 1 / 3, 1 / 6])
    assert [e["mean_confidence"] for e in summary] == pytest.approx([0.6, 0.6, 1.0])


def test_overlay_blends_the_palette_and_leaves_background_alone():
    image = noise_image(5, 4)
    class_map = np.zeros((4, 5), dtype=np.uint8)
    class_map[1:3, 2:4] = 3
    class_map[3, 0] = 1

    overlay = np.asarray(render_overlay(image, class_map, alpha=0.25)).astype(np.float64)

    photo = np.asarray(image).astype(np.float64)
    background = class_map == 0
    np.testing.assert_array_equal(overlay[background], photo[background])
    expected = np.rint(0.75 * photo + 0.25 * palette(4)[class_map])
    np.testing.assert_allclose(overlay[~background], expected[~background], atol=1)


def test_overlay_refuses_a_class_map_of_another_size():
    with pytest.raises(ValueError, match="does not match"):
        render_overlay(noise_image(5, 4), np.zeros((5, 4), dtype=np.uint8))


# ------------------------------------------------------------------ execution modes


@pytest.mark.parametrize("requested, device, native, guard, expected", [
    ("fp32", "cpu", True, True, "fp32"),
    ("auto", "cpu", True, True, "bf16"),
    ("auto", "cpu", True, False, "fp32"),
    ("auto", "cpu", False, True, "fp32"),  # emulated bf16 is slower than fp32
    ("bf16", "cpu", True, False, "bf16"),  # an explicit choice needs no guard
    ("bf16", "cpu", False, True, "fp32"),
    ("auto", "cuda", False, True, "fp16"),
    ("auto", "cuda", False, False, "fp32"),
    ("bf16", "cuda", False, False, "bf16"),
    ("fp32", "cuda", False, True, "fp32"),
])
def test_choose_precision_follows_hardware_guard_and_request(monkeypatch, requested, device, native, guard, expected):
    monkeypatch.setattr(predictor_module, "cpu_supports_bf16", lambda: native)
    assert choose_precision(requested, torch.device(device), lambda dtype: guard) == expected


def test_the_guard_is_not_read_when_it_cannot_change_the_choice(monkeypatch):
    def unreadable(dtype: str) -> bool:
        raise AssertionError("guard consulted")
    monkeypatch.setattr(predictor_module, "cpu_supports_bf16", lambda: False)
    assert choose_precision("auto", torch.device("cpu"), unreadable) == "fp32"
    assert choose_precision("fp32", torch.device("cuda"), unreadable) == "fp32"


def test_unknown_precision_or_backend_is_refused(checkpoint_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor.from_checkpoint(checkpoint_path, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="backend must be one of"):
        Predictor.from_checkpoint(checkpoint_path, device="cpu", backend="tensorrt")


def test_bf16_predictions_are_valid_and_mostly_agree_with_fp32(checkpoint_path, predictor, monkeypatch):
    monkeypatch.setattr(predictor_module, "cpu_supports_bf16", lambda: True)
    bf16 = Predictor.from_checkpoint(checkpoint_path, device="cpu", precision="bf16")
    assert bf16.precision == "bf16" and predictor.precision == "fp32"  # no guard record: auto stays fp32
    image = noise_image(53, 37)
    reduced, full = bf16.predict(image), predictor.predict(image)
    assert_valid(reduced, 37, 53)
    # A random tiny network has near-ties everywhere; the logits still agree to bf16's precision.
    np.testing.assert_allclose(reduced.confidence, full.confidence, atol=0.05)


def test_compiled_predictor_matches_eager_without_recompiling_per_size(checkpoint_path, predictor):
    compiled = Predictor.from_checkpoint(checkpoint_path, device="cpu", precision="fp32", compiled=True)
    graphs = dict(torch._dynamo.utils.counters["stats"])

    def check(width: int, height: int) -> None:
        image = noise_image(width, height, seed=width)
        expected, actual = predictor.predict(image), compiled.predict(image)
        assert_valid(actual, height, width)
        np.testing.assert_array_equal(actual.class_map, expected.class_map)
        np.testing.assert_allclose(actual.confidence, expected.confidence, rtol=1e-4)

    for width, height in ((53, 37), (37, 53), (97, 101)):
        check(width, height)
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # the warm-up compiled for every size
    check(200, 5)  # 1 pixel high at the bottom of the U-Net: one more graph, still right


def test_onnxruntime_backend_refuses_bf16(checkpoint_path):
    with pytest.raises(ValueError, match="fp32 only"):
        Predictor.from_checkpoint(checkpoint_path, device="cpu", precision="bf16", backend="onnxruntime")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("precision, expected", [("fp32", "fp32"), ("bf16", "bf16"), ("auto", "fp32")])
def test_cuda_predictions_match_the_cpu_in_each_precision(checkpoint_path, predictor, precision, expected):
    cuda = Predictor.from_checkpoint(checkpoint_path, device="cuda", precision=precision)
    assert cuda.precision == expected and next(cuda.model.parameters()).is_cuda
    image = noise_image(97, 101)
    prediction = cuda.predict(image)
    assert_valid(prediction, 101, 97)
    np.testing.assert_allclose(prediction.confidence, predictor.predict(image).confidence, atol=0.05)


def test_preprocess_normalises_bit_for_bit_as_training_does_in_channels_last_memory(predictor):
    image = noise_image(48, 29, seed=5)
    batch, _ = predictor.preprocess(image)
    padded = np.pad(np.asarray(image), ((0, 3), (0, 0), (0, 0)))
    assert torch.equal(batch, to_tensor(padded)[None])
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_preprocess_resizes_bilinearly_so_an_edge_doubled_in_size_ramps_by_quarters(predictor):
    # Half the network's size: bilinear puts the two new columns at a quarter and three quarters of
    # the step; nearest and box keep the step, bicubic, Hamming and Lanczos give other values.
    edge = np.zeros((16, 24, 3), dtype=np.uint8)
    edge[:, 12:] = 255
    batch, info = predictor.preprocess(Image.fromarray(edge))
    assert info.resized_size == (32, 48)
    grey = np.array([0, 63.75, 191.25, 255]) / 255
    expected = (grey[:, None] - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # columns 22..25 x channels
    for row in batch[0, :, :, 22:26].permute(1, 2, 0).numpy():
        np.testing.assert_allclose(row, expected, atol=0.5 / 255 / min(IMAGENET_STD))


def test_overlay_colours_many_class_maps_like_byte_class_maps():
    image = noise_image(6, 3)
    class_map = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 7, 7, 0, 0]], dtype=np.uint8)
    expected = np.asarray(render_overlay(image, class_map))
    np.testing.assert_array_equal(np.asarray(render_overlay(image, class_map.astype(np.int32))), expected)


@pytest.mark.parametrize("change", [{"arch": "no-such-model"}, {"arch_args": {"num_classes": 3, "base_width": 8}}])
def test_checkpoint_whose_meta_and_weights_disagree_is_a_checkpoint_error(tmp_path, change):
    checkpoint = load_checkpoint(make_checkpoint(tmp_path / "good.pth"))
    checkpoint["meta"].update(change)
    save_checkpoint(tmp_path / "bad.pth", checkpoint)
    with pytest.raises(CheckpointError, match="do not make a model"):
        Predictor.from_checkpoint(tmp_path / "bad.pth", device="cpu")
    with pytest.raises(CheckpointError, match="do not make a model"):  # test.py's and the exporter's loader
        load_model(tmp_path / "bad.pth", torch.device("cpu"))


def test_a_long_thin_photo_is_padded_to_what_segnet_needs():
    """At input size 64, a 640x10 photo becomes 64x1 (padded to 16 by the multiple): SegNet needs 32."""
    torch.manual_seed(0)
    arch_args = {"num_classes": 3, "base_width": 4}
    model = build_model("segnet", **arch_args)
    meta = model_meta("segnet", arch_args, ["background", "a", "b"], (64, 64), IMAGENET_MEAN, IMAGENET_STD)
    prediction = Predictor(model, meta, torch.device("cpu")).predict(Image.new("RGB", (640, 10)))
    assert prediction.class_map.shape == (10, 640)
