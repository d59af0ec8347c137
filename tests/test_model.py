"""U-Net shapes and the model registry, on CPU with tiny widths."""
from __future__ import annotations

import pytest
import torch

from model import build_from_meta, build_model, model_meta
from model.registry import ARCHITECTURES
from model.unet import UNet
from utils.checkpoint import load_checkpoint, save_checkpoint

NUM_CLASSES = 5
BASE_WIDTH = 4


def tiny_unet(bilinear: bool) -> UNet:
    torch.manual_seed(0)
    return UNet(num_classes=NUM_CLASSES, base_width=BASE_WIDTH, bilinear=bilinear).eval()


@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("height, width", [(37, 53), (64, 65), (16, 16), (33, 17)])
def test_unet_output_matches_any_input_size(bilinear, height, width):
    logits = tiny_unet(bilinear)(torch.randn(2, 3, height, width))
    assert logits.shape == (2, NUM_CLASSES, height, width)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("bilinear, bottom_channels", [(True, 8 * BASE_WIDTH), (False, 16 * BASE_WIDTH)])
def test_bilinear_mode_halves_the_bottom_channels(bilinear, bottom_channels):
    model = tiny_unet(bilinear)
    seen = []
    model.downs[-1].register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1]))
    model(torch.randn(1, 3, 32, 32))
    assert seen == [bottom_channels]


def test_unet_rejects_inputs_smaller_than_its_four_poolings():
    with pytest.raises(ValueError, match="at least 16x16"):
        tiny_unet(True)(torch.randn(1, 3, 15, 40))


def test_every_parameter_receives_a_gradient():
    model = tiny_unet(False).train()
    model(torch.randn(2, 3, 35, 29)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_registry_builds_unet_with_its_arguments():
    model = build_model("unet", num_classes=7, base_width=BASE_WIDTH, bilinear=False)
    assert isinstance(model, UNet)
    assert model.outc.out_channels == 7
    assert "unet" in ARCHITECTURES


def test_registry_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'segformer'.*unet"):
        build_model("segformer", num_classes=3)


def test_model_meta_refuses_mismatched_class_names():
    with pytest.raises(ValueError, match="2 class names for a model of 3 classes"):
        model_meta("unet", {"num_classes": 3}, ["a", "b"], [32, 32], [0.5] * 3, [0.25] * 3)


@pytest.mark.parametrize("bilinear", [True, False])
def test_build_from_meta_round_trips_through_a_checkpoint(tmp_path, bilinear):
    arch_args = {"num_classes": NUM_CLASSES, "base_width": BASE_WIDTH, "bilinear": bilinear}
    model = build_model("unet", **arch_args).eval()
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    meta = model_meta("unet", arch_args, names, (48, 40), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    save_checkpoint(tmp_path / "model.pth", {"model": model.state_dict(), "meta": meta})

    loaded = load_checkpoint(tmp_path / "model.pth")
    rebuilt = build_from_meta(loaded["meta"])
    rebuilt.load_state_dict(loaded["model"])
    rebuilt.eval()

    assert loaded["meta"] == {"arch": "unet", "arch_args": arch_args, "num_classes": NUM_CLASSES,
                              "class_names": names, "input_size": [48, 40], "mean": [0.485, 0.456, 0.406],
                              "std": [0.229, 0.224, 0.225], "ignore_index": 255}
    images = torch.randn(1, 3, 41, 23)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))
