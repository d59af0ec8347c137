"""SMP U-Net over pretrained-capable encoders: shapes at odd sizes, the encoder-weights key rule and
its errors, the files in ../shared/weights, and the fine-tuning options (encoder learning rate,
frozen BatchNorm statistics, frozen encoder epochs)."""
from __future__ import annotations

import logging
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from model import build_model, model_meta
from model.deeplab_voc import load_voc_teacher
from model.encoder_weights import EncoderWeightsError, encoder_key, load_encoder_weights
from model.smp_choices import ENCODERS
from tests.conftest import SHARED_DATA, shared_weights
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.classes import VOC_CLASSES
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from utils.fileio import file_sha256
from utils.inference.predictor import Predictor
from utils.training.prepare import parameter_groups

IMAGENET_FILE = "mobilenet_v2-tf2ptq-6cf85aa2.pth"
DEEPLAB_FILE = "deeplabv3_mobilenet_v2_voc-tfqat-eeae4f3a.pth"
ODD_SIZE = (97, 131)


def unet(encoder: str = "mobilenet_v2", output_stride: int = 32, num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("smp_unet", num_classes=num_classes, encoder=encoder, encoder_output_stride=output_stride)


@pytest.mark.parametrize(("encoder", "output_stride"), [(name, 32) for name in ENCODERS] + [("mobilenet_v2", 16)])
def test_every_encoder_gives_logits_of_the_input_size(encoder, output_stride):
    model = unet(encoder, output_stride).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *ODD_SIZE))
    assert logits.shape == (1, 3, *ODD_SIZE)
    assert torch.isfinite(logits).all()


def test_output_stride_16_keeps_the_deepest_features_at_a_sixteenth():
    for output_stride in (32, 16):
        features = unet("mobilenet_v2", output_stride).encoder(torch.randn(1, 3, 64, 96))
        assert features[-1].shape[-2:] == (64 // output_stride, 96 // output_stride)


def test_unknown_encoder_and_undilatable_stride_are_refused():
    with pytest.raises(ValueError, match="unknown encoder"):
        unet("resnet7")
    with pytest.raises(ValueError, match="output stride 16"):
        unet("resnet18", 16)


def torchvision_like_state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random tensors under the encoder's own names (plus a classifier the encoder lacks)."""
    state = {f"{prefix}{key}": torch.randn_like(value) if value.is_floating_point() else value
             for key, value in model.encoder.state_dict().items()}
    state["classifier.1.weight"] = torch.randn(10, 1280)
    return state


@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "encoder."])
def test_a_written_state_dict_lands_exactly_in_the_encoder(tmp_path, prefix):
    model = unet()
    state = torchvision_like_state(model, prefix)
    if prefix == "backbone.":  # torchvision segmentation models store features as the backbone itself
        state = {key.replace("backbone.features.", "backbone."): value for key, value in state.items()}
    path = tmp_path / "weights.pth"
    torch.save({"model": state}, path)
    report = load_encoder_weights(model, str(path), "mobilenet_v2")
    loaded = model.encoder.state_dict()
    for key, value in state.items():
        if encoder_key(key) in loaded:
            assert torch.equal(loaded[encoder_key(key)], value), key
    assert report.missing == [] and report.unused == 1
    assert report.source == "weights.pth" and len(report.sha256) == 64


def test_layers_the_file_lacks_keep_their_values_and_are_named(tmp_path, caplog):
    model = unet()
    before = model.encoder.features[18][0].weight.clone()
    state = {key: value for key, value in torchvision_like_state(model).items() if not key.startswith("features.18")}
    torch.save(state, tmp_path / "partial.pth")
    with caplog.at_level(logging.INFO):
        report = load_encoder_weights(model, str(tmp_path / "partial.pth"), "mobilenet_v2")
    assert torch.equal(model.encoder.features[18][0].weight, before)
    assert "features.18.0.weight" in report.missing
    assert "features.18.0, features.18.1" in caplog.text


def test_a_tensor_of_another_shape_is_a_one_line_error_naming_it(tmp_path):
    model = unet()
    state = torchvision_like_state(model)
    state["features.3.conv.0.0.weight"] = torch.randn(7, 1, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    before = model.encoder.features[0][0].weight.clone()
    with pytest.raises(EncoderWeightsError, match=r"features\.3\.conv\.0\.0\.weight has shape \(7, 1, 3, 3\)") as error:
        load_encoder_weights(model, str(tmp_path / "bad.pth"), "mobilenet_v2")
    assert "\n" not in str(error.value)
    assert torch.equal(model.encoder.features[0][0].weight, before)  # nothing half-loaded


def test_a_file_of_another_network_is_refused(tmp_path):
    torch.save(unet("resnet18").encoder.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(EncoderWeightsError, match="matches only 0 of the encoder's"):
        load_encoder_weights(unet("mobilenet_v2"), str(tmp_path / "resnet.pth"), "mobilenet_v2")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"features.0.0.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_encoder_weights(unet(), str(tmp_path / "evil.pth"), "mobilenet_v2")
    assert not marker.exists()


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """torch.hub's cache in a temporary folder, and published weights named as this test says."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def publish(file_name: str) -> Path:
        weights = SimpleNamespace(DEFAULT=SimpleNamespace(url=f"https://download.invalid/models/{file_name}"))
        monkeypatch.setattr("torchvision.models.get_model_weights", lambda name: weights)
        return tmp_path / "hub" / "checkpoints" / file_name
    return publish


def test_imagenet_offline_says_to_pass_a_file(hub, monkeypatch):
    hub("mobilenet_v2-7ebf99e0.pth")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(EncoderWeightsError, match="offline, pass a local file of them instead"):
        load_encoder_weights(unet(), "imagenet", "mobilenet_v2")


def cache(path: Path, tensors: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)


def cache_under_its_hash(hub, tensors: dict, staging: Path) -> None:
    """``tensors`` in the cache under a published name whose sha256 prefix is the file's own."""
    cache(staging, tensors)
    published = hub(f"mobilenet_v2-{file_sha256(staging)[:8]}.pth")
    published.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(published)


def test_published_weights_load_from_the_cache_when_their_hash_matches(hub, tmp_path):
    encoder = unet().encoder.state_dict()
    cache_under_its_hash(hub, encoder, tmp_path / "staged.pth")
    report = load_encoder_weights(unet(), "imagenet", "mobilenet_v2")
    assert report.loaded == len([key for key in encoder if not key.endswith("num_batches_tracked")])


def test_a_cached_file_that_does_not_match_its_published_hash_is_refused(hub):
    cached = hub("mobilenet_v2-7ebf99e0.pth")
    cache(cached, unet().encoder.state_dict())  # any other file under the published name
    with pytest.raises(EncoderWeightsError, match="does not match the published sha256 .7ebf99e0"):
        load_encoder_weights(unet(), "imagenet", "mobilenet_v2")


def test_a_cached_pickle_that_would_run_code_is_refused_even_with_a_matching_name(hub, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cache_under_its_hash(hub, {"features.0.0.weight": Payload()}, tmp_path / "staged.pth")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_encoder_weights(unet(), "imagenet", "mobilenet_v2")
    assert not marker.exists()


def test_a_download_is_checked_against_the_published_hash(hub, monkeypatch):
    hub("mobilenet_v2-7ebf99e0.pth")
    asked = {}
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, hash_prefix=None, progress=True: asked.update(hash_prefix=hash_prefix) or
                        (_ for _ in ()).throw(RuntimeError(f'invalid hash value (expected "{hash_prefix}")')))
    with pytest.raises(EncoderWeightsError, match="invalid hash value"):
        load_encoder_weights(unet(), "imagenet", "mobilenet_v2")
    assert asked == {"hash_prefix": "7ebf99e0"}


def test_encoder_learns_at_a_fraction_of_the_decoder_rate():
    model = unet()
    decoder_group, encoder_group = parameter_groups(model, 1e-3, 0.1)
    assert decoder_group["lr"] == 1e-3 and encoder_group["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in encoder_group["params"]} == {id(p) for p in model.encoder.parameters()}
    assert len(decoder_group["params"]) + len(encoder_group["params"]) == len(list(model.parameters()))


def test_frozen_batchnorm_keeps_the_encoder_statistics_in_training():
    model = unet()
    model.freeze_encoder_batchnorm()
    model.train()
    encoder_bn, decoder_bn = model.encoder.features[0][1], model.net.decoder.blocks[0].conv1[1]
    before = encoder_bn.running_mean.clone(), decoder_bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert torch.equal(encoder_bn.running_mean, before[0])
    assert not torch.equal(decoder_bn.running_mean, before[1])
    assert model.training and not encoder_bn.training


# ---------------------------------------------------------------- the files in ../shared/weights


def test_imagenet_file_loads_and_classifies_a_school_bus():
    path = shared_weights(IMAGENET_FILE)
    image_path = SHARED_DATA / "coco128" / "train2017" / "000000000471.jpg"
    if not image_path.exists():
        pytest.skip(f"{image_path} is absent")
    classifier = mobilenet_v2()
    classifier.load_state_dict(torch.load(path, weights_only=True))
    image = np.asarray(Image.open(image_path).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
    with torch.no_grad():
        top = classifier.eval()(to_tensor(image)[None]).argmax(1).item()
    assert MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"][top] == "school bus"
    report = load_encoder_weights(unet(), str(path), "mobilenet_v2")
    assert report.missing == [] and report.loaded == 260


def test_deeplab_file_loads_into_the_dilated_encoder_and_the_teacher():
    path = shared_weights(DEEPLAB_FILE)
    model = unet("mobilenet_v2", 16)
    report = load_encoder_weights(model, str(path), "mobilenet_v2")
    assert {key.rsplit(".", 2)[0] for key in report.missing} == {"features.18"}
    teacher = load_voc_teacher(path)
    assert torch.equal(teacher.backbone[5].conv[0][0].weight, model.encoder.features[5].conv[0][0].weight)
    image_path = SHARED_DATA / "coco-tiny" / "val2017" / "000000324614.jpg"  # a person brushing her teeth
    if image_path.exists():
        image = np.asarray(Image.open(image_path).convert("RGB"))
        with torch.no_grad():
            classes = teacher(to_tensor(image)[None]).argmax(1)
        assert (classes == VOC_CLASSES.index("person")).float().mean() > 0.1


def test_compiled_predictor_of_an_encoder_model_matches_eager(tmp_path):
    """torch.compile (SEG_COMPILE=1) lowers the padding to the encoder's stride at any size.  On
    ResNet-18, which compiles in 60 % of MobileNetV2's time; both pad to a multiple of 32."""
    arch_args = {"num_classes": 3, "encoder": "resnet18"}
    meta = model_meta("smp_unet", arch_args, ["a", "b", "c"], [64, 64], IMAGENET_MEAN, IMAGENET_STD)
    save_checkpoint(tmp_path / "smp.pth", {"model": unet("resnet18").state_dict(), "meta": meta})
    eager = Predictor.from_checkpoint(tmp_path / "smp.pth", device="cpu", precision="fp32")
    compiled = Predictor.from_checkpoint(tmp_path / "smp.pth", device="cpu", precision="fp32", compiled=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    np.testing.assert_allclose(compiled.predict(image).confidence, eager.predict(image).confidence, rtol=1e-3)
