"""ONNX export: one graph for every height and width, equal to PyTorch, and the export command."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from model import NEVER_LOGIT, build_model, load_model, never_predict
from model.export_onnx import (
    CHECKPOINT_KEY,
    NotExportable,
    check_sizes,
    export_onnx,
    exportable_copy,
    largest_difference,
    onnxruntime_session,
    run_session,
)
from tests.conftest import requires
from tests.test_predictor import assert_valid, noise_image
from tests.tiny_checkpoint import make_checkpoint
from tools import export_onnx as export_command
from utils.classes import COCO_CLASSES, COCO_UNUSED_IDS, never_labelled_ids
from utils.fileio import file_sha256
from utils.inference import onnx_runtime
from utils.inference.predictor import Predictor

pytestmark = [requires("onnxscript", reason="ONNX export needs onnx + onnxscript (requirements-dev.txt)"),
              requires("onnxruntime", reason="the check runs the export in onnxruntime (requirements-dev.txt)")]


FIVE_CLASSES = [f"class {i}" for i in range(5)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, int, str]:
    """A tiny U-Net checkpoint exported by the command: (its folder, exit code, what it printed).
    The graph tests below check this one export rather than making their own."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(folder / "tiny.pth", class_names=FIVE_CLASSES, varied=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = export_command.main(["--checkpoint", str(checkpoint)])
    return folder, code, printed.getvalue()


@pytest.fixture(scope="module")
def tiny_unet(exported):
    return load_model(exported[0] / "tiny.pth", torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def session(exported):
    return onnxruntime_session(exported[0] / "tiny.onnx", threads=1)


@pytest.mark.parametrize("height, width", [(37, 53), (101, 97), (16, 16), (48, 64), (17, 250), (127, 31)])
def test_the_exported_graph_reproduces_pytorch_at_any_size(tiny_unet, session, height, width):
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    logits = run_session(session, images)
    with torch.inference_mode():
        expected = tiny_unet(images)
    assert logits.shape == (2, 5, height, width)
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_largest_difference_sees_a_model_that_is_not_the_exported_one(tiny_unet, session):
    assert largest_difference(tiny_unet, session) < 1e-4
    other = build_model("unet", num_classes=5, base_width=4, bilinear=True).eval()
    assert largest_difference(other, session) > 1e-3


def test_the_command_writes_a_checked_file_that_names_its_checkpoint(exported):
    folder, code, printed = exported
    assert code == 0
    assert "largest logit difference" in printed
    session = onnxruntime_session(folder / "tiny.onnx")
    images = torch.randn(1, 3, 45, 61)
    assert run_session(session, images).shape == (1, 5, 45, 61)
    assert session.get_modelmeta().custom_metadata_map[CHECKPOINT_KEY] == file_sha256(folder / "tiny.pth")
    assert not list(folder.glob(".*.tmp"))


class ExportedAgain(Exception):
    """Raised instead of an export: the backend did not take the file beside the checkpoint."""


def refuse_to_export(model, checkpoint_sha256=None):
    raise ExportedAgain


def test_the_onnxruntime_backend_serves_the_commands_file_as_torch_does(exported, monkeypatch):
    checkpoint = exported[0] / "tiny.pth"
    expected = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    monkeypatch.setattr(onnx_runtime, "export_onnx", refuse_to_export)
    onnx = Predictor.from_checkpoint(checkpoint, device="cpu", backend="onnxruntime")
    assert onnx.precision == "fp32" and onnx.backend == "onnxruntime"
    for width, height in ((53, 37), (64, 64), (97, 101)):
        image = noise_image(width, height, seed=height)
        reference, actual = expected.predict(image), onnx.predict(image)
        assert_valid(actual, height, width, num_classes=5)
        np.testing.assert_allclose(actual.confidence, reference.confidence, rtol=1e-4)
        # A varied network has near-ties, which other kernels may break the other way.
        assert (actual.class_map == reference.class_map).mean() > 0.999
    assert len(np.unique(reference.class_map)) > 1  # a varied network: the class maps can differ


@pytest.mark.parametrize("change, said", [("another checkpoint", "was not exported from it"),
                                          ("unreadable", "is unreadable here")])
def test_the_onnxruntime_backend_exports_again_rather_than_serve_a_file_not_of_its_checkpoint(
        exported, tmp_path, monkeypatch, caplog, change, said):
    # Not varied: other weights, so another sha256, for the same network and classes.
    checkpoint = make_checkpoint(tmp_path / "tiny.pth", class_names=FIVE_CLASSES)
    data = (exported[0] / "tiny.onnx").read_bytes()
    (tmp_path / "tiny.onnx").write_bytes(data if change == "another checkpoint" else data[: len(data) // 2])
    monkeypatch.setattr(onnx_runtime, "export_onnx", refuse_to_export)
    with pytest.raises(ExportedAgain):
        Predictor.from_checkpoint(checkpoint, device="cpu", backend="onnxruntime")
    assert f"tiny.onnx {said}" in caplog.text and "until tools/export_onnx.py writes it again" in caplog.text


def test_the_command_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert export_command.main(["--checkpoint", str(tmp_path / "absent.pth")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: checkpoint not found") and "\n" not in error


def batch_norm_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]


class Reordered(torch.nn.Sequential):
    """A Sequential whose forward is its own, batch norm first: folding its norm into its
    convolution would change what it computes."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self[0](self[1](images))


def look_trained(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with batch norm statistics and affine maps of the kind training leaves: a fresh
    batch norm computes almost nothing (mean 0, variance 1, scale 1, shift 0), so that folding it
    wrongly would go unseen."""
    for norm in (module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)):
        torch.nn.init.uniform_(norm.weight.data, 0.5, 1.5)
        for values in (norm.bias, norm.running_mean):
            torch.nn.init.normal_(values.data, std=0.2)
        torch.nn.init.uniform_(norm.running_var, 0.5, 2.0)
    return model


def test_the_exported_copy_folds_the_batch_norms_of_a_plain_chain_and_leaves_the_model_alone():
    torch.manual_seed(0)
    hooked = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))
    hooked[0].register_forward_hook(lambda module, inputs, output: output.clamp(max=0.5))
    model = look_trained(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
        Reordered(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)), hooked,
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))))  # its last pair folds too
    # Without running statistics a batch norm normalises by each batch's own, which no convolution can hold.
    model.append(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, track_running_stats=False)))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    copy = exportable_copy(model)  # from a model in training mode: the copy is in eval mode, the model stays
    assert not copy.training and model.training
    model.eval()
    assert batch_norm_names(copy) == ["3.1", "4.1", "6.1"]  # the chains' own; reordered, hooked, untracked kept
    assert not copy[2].inplace and model[2].inplace
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    images = torch.randn(2, 3, 9, 11)
    with torch.inference_mode():
        torch.testing.assert_close(copy(images), model(images), atol=1e-5, rtol=1e-5)


def test_the_default_models_architecture_exports_with_its_masked_classes():
    """SMP's U-Net with the VOC head and logits at 1/4 upsampled (save/default), COCO's classes, the
    unused ids masked by a forward hook."""
    torch.manual_seed(0)
    model = look_trained(build_model("smp_unet", num_classes=91, encoder="mobilenet_v2", encoder_output_stride=16,
                                     voc_head=True, logit_stride=4))
    never_predict(model, never_labelled_ids(COCO_CLASSES))
    inplace = [module.inplace for module in model.modules() if hasattr(module, "inplace")]
    norms = batch_norm_names(model)
    session = onnxruntime_session(export_onnx(model.eval()), threads=1)
    # Exported from a copy with MobileNetV2's ReLU6s out of place and its batch norms folded into the
    # convolutions (faster); the model keeps both.
    assert any(inplace) and [module.inplace for module in model.modules() if hasattr(module, "inplace")] == inplace
    assert norms and batch_norm_names(model) == norms
    images = torch.randn(1, 3, 53, 75)
    logits = run_session(session, images)
    with torch.inference_mode():
        expected = model(images)
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-3, rtol=1e-3)
    assert (logits[:, list(COCO_UNUSED_IDS)] == NEVER_LOGIT).all()


def with_one_middle_flow_block(model: torch.nn.Module) -> torch.nn.Module:
    """DeepLabV3+ on Xception-65 with its middle flow cut from 16 blocks to the first: they are one
    728-channel residual unit repeated at stride 16, which no feature is taken from, and exporting
    all 16 cost two thirds of the export's time (16 of 25 s, AMD EPYC avx512_bf16)."""
    blocks = model.encoder.model
    feature_blocks = {name.split(".")[1] for name in blocks.feature_info.module_name() if name.startswith("blocks.")}
    middle = [f"blocks_{index}" for index in range(4, 19)]
    assert feature_blocks.isdisjoint({name.removeprefix("blocks_") for name in middle})
    for name in middle:
        delattr(blocks, name)
    return model


@pytest.mark.parametrize("arch, arch_args, shorten", [("smp_fpn", {"encoder": "resnet18"}, None),
                                                      ("smp_pspnet", {"encoder": "resnet18"}, None),
                                                      ("deeplabv3plus_xception", {}, with_one_middle_flow_block)],
                         ids=["smp_fpn", "smp_pspnet", "deeplabv3plus_xception"])
def test_the_new_architectures_export_one_graph_for_every_size(arch, arch_args, shorten):
    """CHECK_SIZES include 16x16, where PSPNet's stride-8 map (2x2) is smaller than its 6 bins.
    The SMP decoders sit on ResNet-18, which exports in half MobileNetV2's time (MobileNetV2 is
    exported with the default model's architecture above)."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, **arch_args).eval()
    model = shorten(model) if shorten else model
    session = onnxruntime_session(export_onnx(model), threads=1)
    assert largest_difference(model, session) < 1e-4


@pytest.mark.parametrize("arch, arch_args", [("segnet", {"base_width": 4}),
                                             ("unet", {"base_width": 4, "padding_mode": "reflect"})])
def test_models_that_need_32_pixels_export_and_are_checked_from_32(arch, arch_args):
    """SegNet's unpooling is a scatter the exporter knows; both models refuse inputs below 32 pixels,
    so they are traced and checked at sizes scaled up to that."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, **arch_args).eval()
    assert min(min(size) for size in check_sizes(model)) == 32
    session = onnxruntime_session(export_onnx(model), threads=1)
    assert largest_difference(model, session) < 1e-4


class DataDependent(torch.nn.Module):
    """A branch on the values, not the shapes: something torch.export cannot trace."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images if images.sum() > 0 else -images


def test_a_model_the_exporter_cannot_trace_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(NotExportable, match="torch.onnx could not export DataDependent"):
        export_onnx(DataDependent())
    checkpoint = make_checkpoint(tmp_path / "tiny.pth")
    monkeypatch.setattr(export_command, "load_model", lambda *_: (DataDependent(), {}))
    assert export_command.main(["--checkpoint", str(checkpoint)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: torch.onnx could not export DataDependent") and "\n" not in error
    assert not (tmp_path / "tiny.onnx").exists()
