"""smp_pspnet keeps only the encoder stages it reads, and still loads checkpoints saved with all of them."""
from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from model import build_model, model_from_checkpoint, model_meta
from model.pyramid_pooling import use_exportable_pyramid_pooling
from model.smp_models import PSPNET_DEPTH, over_encoder
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def full_encoder_pspnet(encoder: str) -> torch.nn.Module:
    """smp_pspnet as built before its unused stages were removed."""
    model = over_encoder(smp.PSPNet, 3, encoder, encoder_depth=PSPNET_DEPTH)
    use_exportable_pyramid_pooling(model.net)
    return model.eval()


def unused_parameters(model: torch.nn.Module) -> list[str]:
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    return [name for name, parameter in model.named_parameters() if parameter.grad is None]


@pytest.mark.parametrize(("encoder", "removed_prefix"), [("mobilenet_v2", "net.encoder.features.7."),
                                                         ("resnet18", "net.encoder.layer3."),
                                                         ("vgg16_bn", "net.encoder.features.34.")])
def test_every_parameter_gets_a_gradient_and_the_deeper_stages_are_gone(encoder, removed_prefix):
    torch.manual_seed(0)
    old = full_encoder_pspnet(encoder)
    assert unused_parameters(old)  # guard: SMP's own model has parameters DDP would wait for
    model = build_model("smp_pspnet", num_classes=3, encoder=encoder)
    assert unused_parameters(model) == []
    assert any(key.startswith(removed_prefix) for key in model.removed_keys)
    assert model.removed_keys == set(old.state_dict()) - set(model.state_dict())


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "resnet18"])
def test_a_checkpoint_saved_with_every_stage_loads_strictly_and_predicts_the_same(encoder, tmp_path):
    torch.manual_seed(1)
    old = full_encoder_pspnet(encoder)
    meta = model_meta("smp_pspnet", {"num_classes": 3, "encoder": encoder}, ["a", "b", "c"], [64, 64],
                      IMAGENET_MEAN, IMAGENET_STD)
    save_checkpoint(tmp_path / "old.pth", {"model": old.state_dict(), "meta": meta})
    model = model_from_checkpoint(load_checkpoint(tmp_path / "old.pth")).eval()
    images = torch.randn(1, 3, 72, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(images), old(images))


def test_only_the_removed_keys_are_tolerated():
    old_state = full_encoder_pspnet("mobilenet_v2").state_dict()
    model = build_model("smp_pspnet", num_classes=3)
    with pytest.raises(RuntimeError, match="Unexpected key.*features.99"):
        model.load_state_dict({**old_state, "net.encoder.features.99.weight": torch.zeros(1)})
    kept = next(key for key in old_state if key.startswith("net.encoder.features.6."))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in old_state.items() if k != kept})
