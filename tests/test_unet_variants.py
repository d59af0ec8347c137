"""U-Net variants: reflect padding, bottleneck dropout and leaky ReLU do what they say, and none
of them changes the parameters, so checkpoints of the default U-Net load into every variant."""
from __future__ import annotations

import pytest
import torch

import train
from model import build_model
from model.unet_parts import ConvStyle, DoubleConv
from utils.training.options import TrainingError, arch_args
from utils.training.prepare import check_options

VARIANTS = [{"padding_mode": "reflect"}, {"dropout": 0.5}, {"activation": "leaky_relu"}]


def unet(**variant) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", num_classes=3, base_width=4, **variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_default_unet_state_dict_loads_into_every_variant(variant):
    default = unet().state_dict()
    model = unet(**variant)
    model.load_state_dict(default)  # strict: same names and shapes
    assert all(torch.equal(model.state_dict()[key], value) for key, value in default.items())


def test_reflect_padding_continues_the_image_where_zero_padding_darkens_the_border():
    flat = torch.full((1, 1, 8, 8), 2.0)
    for padding_mode in ("zeros", "reflect"):
        conv = ConvStyle(padding_mode=padding_mode).conv(1, 1)
        torch.nn.init.constant_(conv.weight, 1.0)
        out = conv(flat)[0, 0]
        assert torch.allclose(out[1:-1, 1:-1], torch.tensor(18.0))  # the interior never sees padding
        border_is_flat = torch.allclose(out, torch.tensor(18.0))
        assert border_is_flat == (padding_mode == "reflect")


def test_reflect_padding_changes_only_the_border_of_a_double_conv():
    images = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for padding_mode in ("zeros", "reflect"):
        torch.manual_seed(0)
        outputs[padding_mode] = DoubleConv(2, 3, style=ConvStyle(padding_mode=padding_mode)).eval()(images)
    # Two 3x3 convolutions: padding reaches two pixels in from the border.
    assert torch.equal(outputs["zeros"][..., 2:-2, 2:-2], outputs["reflect"][..., 2:-2, 2:-2])
    assert not torch.allclose(outputs["zeros"][..., 0, :], outputs["reflect"][..., 0, :])


def test_reflect_unet_needs_a_bottleneck_of_two_pixels():
    model = unet(padding_mode="reflect").eval()
    assert model(torch.randn(1, 3, 33, 45)).shape == (1, 3, 33, 45)
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 31, 45))


def test_dropout_draws_new_masks_in_training_only():
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for dropout, differs_in_training in ((0.0, False), (0.5, True)):
            model = unet(dropout=dropout).train()
            assert (not torch.equal(model(images), model(images))) == differs_in_training
            model.eval()
            assert torch.equal(model(images), model(images))


def test_dropout_zeroes_about_that_share_of_the_bottleneck():
    model = unet(dropout=0.5).train()
    seen = []
    model.bottleneck_dropout.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    model(torch.randn(2, 3, 64, 64))
    features, dropped = seen[0]
    alive = features != 0  # the ReLU before already zeroed some
    assert 0.35 < (dropped[alive] == 0).float().mean().item() < 0.65


def test_leaky_relu_lets_negative_values_through():
    relu, leaky = ConvStyle().activation_layer(), ConvStyle(activation="leaky_relu").activation_layer()
    assert relu(torch.tensor([-1.0])).item() == 0.0
    assert leaky(torch.tensor([-1.0])).item() == pytest.approx(-0.01)
    images = torch.randn(1, 3, 32, 32)
    default, variant = unet().eval(), unet(activation="leaky_relu").eval()
    assert not torch.allclose(default(images), variant(images))


@pytest.mark.parametrize(("variant", "message"), [({"padding_mode": "circular"}, "padding mode must be one of"),
                                                  ({"activation": "gelu"}, "activation must be one of"),
                                                  ({"dropout": 1.0}, "dropout must be in")])
def test_unknown_variants_are_refused_in_one_line(variant, message):
    with pytest.raises(ValueError, match=message):
        unet(**variant)


def test_train_options_reach_the_checkpoint_arguments():
    args = train.parse_args(["--padding-mode", "reflect", "--dropout", "0.3", "--activation", "leaky_relu"])
    assert arch_args(args, 3) == {"num_classes": 3, "base_width": args.base_width, "bilinear": True,
                                  "padding_mode": "reflect", "dropout": 0.3, "activation": "leaky_relu"}
    # The defaults are left out, so a run from before the variants existed resumes with the same arguments.
    assert arch_args(train.parse_args([]), 3) == {"num_classes": 3, "base_width": args.base_width, "bilinear": True}


@pytest.mark.parametrize("option", [["--dropout", "0.3"], ["--padding-mode", "reflect"],
                                    ["--activation", "leaky_relu"], ["--transposed"]])
def test_unet_options_on_another_model_are_refused_not_ignored(option):
    with pytest.raises(TrainingError, match="options of --model unet only"):
        check_options(train.parse_args(["--model", "segnet", *option]))
    check_options(train.parse_args(["--model", "unet", *option]))
