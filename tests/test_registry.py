"""The registry is the one place an architecture is described: train.py's options, the checkpoint's
model arguments and the option checks all come from its entries."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from torch import nn

import train
from model import registry
from model.registry import ARCHITECTURES, Architecture, Argument
from tests.conftest import ROOT
from utils.training.options import TrainingError, arch_args, check_architecture_options, flag, offered_arguments


def another_value(argument: Argument):
    """A value of ``argument`` other than its default, of the type a user would give."""
    if isinstance(argument.default, bool):
        return not argument.default
    if argument.choices:
        return next(choice for choice in argument.choices if choice != argument.default)
    if argument.default is None:
        return "file.pth"
    return argument.default + 1 if isinstance(argument.default, int) else argument.default + 0.25


def command_line(argument: Argument, value) -> list[str]:
    return [flag(argument)] if isinstance(value, bool) else [flag(argument), str(value)]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_entry_records_what_its_constructor_takes_with_its_defaults(arch):
    entry = ARCHITECTURES[arch]
    signature = inspect.signature(entry.build)
    recorded = arch_args(train.parse_args(["--model", arch]), 3)
    signature.bind(**recorded)  # a recorded argument the constructor lacks raises TypeError
    for keyword, value in recorded.items():
        if keyword != "num_classes" and signature.parameters[keyword].default is not inspect.Parameter.empty:
            assert value == signature.parameters[keyword].default, (arch, keyword)


@pytest.mark.parametrize("name", sorted(offered_arguments()))
def test_every_argument_reaches_the_checkpoint_arguments_of_the_models_that_take_it(name):
    argument, models = offered_arguments()[name]
    value = another_value(argument)
    for arch in models:
        args = train.parse_args(["--model", arch, *command_line(argument, value)])
        check_architecture_options(args)
        keyword = argument.keyword or argument.name
        assert arch_args(args, 3)[keyword] == (argument.convert(value) if argument.convert else value)


@pytest.mark.parametrize("name", sorted(offered_arguments()))
def test_every_argument_is_refused_on_a_model_that_does_not_take_it(name):
    argument, models = offered_arguments()[name]
    other = next(arch for arch in ARCHITECTURES if arch not in models)
    args = train.parse_args(["--model", other, *command_line(argument, another_value(argument))])
    with pytest.raises(TrainingError, match=f"{flag(argument)} is one of the options of --model {models[0]}"):
        check_architecture_options(args)


class Tiny(nn.Module):
    def __init__(self, num_classes: int, kernel: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, kernel, padding=kernel // 2)

    def forward(self, images):
        return self.conv(images)


def test_a_new_architecture_is_one_registry_entry(monkeypatch):
    kernel = Argument("kernel", 1, "convolution size", choices=(1, 3))
    entry = Architecture(f"{__name__}:Tiny", (kernel,), batchnorm_after_pooling=True)
    monkeypatch.setitem(ARCHITECTURES, "tiny", entry)
    args = train.parse_args(["--model", "tiny", "--kernel", "3", "--batch-size", "2"])
    check_architecture_options(args)
    assert arch_args(args, 4) == {"num_classes": 4, "kernel": 3}
    assert registry.build_model("tiny", **arch_args(args, 4)).conv.kernel_size == (3, 3)
    with pytest.raises(TrainingError, match="--kernel is one of the options of --model tiny only"):
        check_architecture_options(train.parse_args(["--model", "unet", "--kernel", "3"]))
    with pytest.raises(TrainingError, match="tiny has BatchNorm after global pooling"):
        check_architecture_options(train.parse_args(["--model", "tiny", "--batch-size", "1"]))


def test_one_name_means_one_argument(monkeypatch):
    other_width = Argument("base_width", 32, "another meaning")
    monkeypatch.setitem(ARCHITECTURES, "tiny", Architecture(f"{__name__}:Tiny", (other_width,)))
    with pytest.raises(TypeError, match="two registry arguments are named 'base_width'"):
        offered_arguments()


def test_an_argument_added_later_stays_out_of_the_record_at_its_default():
    late = Argument("dropout", 0.0, "", recorded_at_default=False)
    assert late.constructor_arguments(0.0) == {}
    assert late.constructor_arguments(0.5) == {"dropout": 0.5}
    assert Argument("transposed", False, "", keyword="bilinear", convert=lambda value: not value
                    ).constructor_arguments(False) == {"bilinear": True}


def test_the_environment_sets_an_argument_s_default(monkeypatch):
    monkeypatch.setenv("SEG_BASE_WIDTH", "16")
    args = train.parse_args(["--model", "segnet"])
    assert args.base_width == 16
    check_architecture_options(train.parse_args(["--model", "smp_unet"]))  # 16 is the default now, not a choice


def test_a_network_of_our_own_is_served_without_importing_smp_or_torchvision(tiny_checkpoint):
    """Every service worker and script starts by importing the registry; SMP and torchvision take
    ~2 s of it, paid only by the processes that build their networks."""
    code = ("import sys, app, torch; from model import load_model; "
            f"load_model({str(tiny_checkpoint)!r}, torch.device('cpu')); "
            "print(sorted({'segmentation_models_pytorch', 'timm', 'torchvision'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
