"""Checkpoints are loaded weights-only by every loader, and files that are not ours are refused.

A hostile .pth holds a pickle that calls ``exec`` when unpickled; the code it would run writes a
marker file.  Each loader must refuse it with a clear error and the marker must never appear.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import mobilenet_v2 as torchvision_mobilenet_v2

import test as test_script
import train
from model import build_model, load_model, load_pretrained, model_meta
from tests.synthetic_coco import make_training_root
from tests.tiny_checkpoint import make_checkpoint
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.inference.predictor import Predictor


class Payload:
    """Unpickles as a call of ``exec`` that writes ``marker``: what a hostile checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A file laid out like one of our training checkpoints, whose weights are the payload."""
    meta = load_checkpoint(make_checkpoint(path.with_suffix(".good.pth")))["meta"]
    torch.save({"model": Payload(marker), "meta": meta, "optimizer": Payload(marker), "epoch": 1}, path)
    return path


@pytest.fixture()
def hostile(tmp_path) -> tuple[Path, Path]:
    """(hostile checkpoint, marker path it would create)."""
    marker = tmp_path / "marker"
    return hostile_checkpoint(tmp_path / "hostile.pth", marker), marker


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_training_root(tmp_path_factory.mktemp("safety"), num_images=4, size=(40, 48), seed=5, max_objects=2)


TINY_UNET = ("--model", "unet", "--base-width", "4")


def train_args(root: Path, save: Path, model: tuple[str, ...] = TINY_UNET) -> list[str]:
    return ["--data-dir", str(root), "--mask-dir", str(root / "masks"), "--save-dir", str(save),
            "--train-split", "train2017", "--val-split", "train2017", *model,
            "--crop-size", "32", "--batch-size", "2", "--workers", "0", "--epochs", "1"]


def test_the_hostile_file_really_runs_code_when_loaded_unsafely(tmp_path):
    """Guard for the tests below: without weights_only, loading it writes the marker."""
    marker = tmp_path / "unsafe-marker"
    torch.load(hostile_checkpoint(tmp_path / "h.pth", marker), weights_only=False)
    assert marker.read_text() == "code ran"


def test_load_checkpoint_refuses_it(hostile):
    path, marker = hostile
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_predictor_refuses_it(hostile):
    path, marker = hostile
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        Predictor.from_checkpoint(path, device="cpu")
    assert not marker.exists()


def test_test_py_refuses_it(hostile, tmp_path, capsys):
    path, marker = hostile
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_model(path, torch.device("cpu"))
    assert test_script.main(["--checkpoint", str(path), "--save-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and "Traceback" not in err
    assert not marker.exists()


def test_resume_refuses_it(hostile, coco_root, tmp_path, capsys):
    path, marker = hostile
    save = tmp_path / "save"
    save.mkdir()
    path.rename(save / "last.pth")
    assert train.main(train_args(coco_root, save) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (save / "model_final.pth").exists()


def test_pretrained_weights_refuse_it(hostile, coco_root, tmp_path, capsys):
    path, marker = hostile
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_pretrained(build_model("unet", num_classes=3, base_width=4), str(path))
    assert train.main(train_args(coco_root, tmp_path / "save") + ["--weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot load weights" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "save" / "model_final.pth").exists()


@pytest.mark.parametrize("option", ["--encoder-weights", "--voc-head", "--distill-from"])
def test_encoder_head_and_teacher_weights_refuse_it(hostile, coco_root, tmp_path, capsys, option):
    path, marker = hostile
    encoder_model = ("--model", "smp_unet", "--encoder", "mobilenet_v2", "--encoder-output-stride", "16")
    if option != "--encoder-weights":  # the VOC head needs its encoder: a harmless one, so the hostile file is reached
        harmless = tmp_path / "mobilenet_v2.pth"
        torch.save(torchvision_mobilenet_v2().state_dict(), harmless)
        encoder_model += ("--encoder-weights", str(harmless))
    assert train.main(train_args(coco_root, tmp_path / "save", encoder_model) + [option, str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot load weights" in err and "Traceback" not in err
    assert f"{option}: " in err  # the message names the option that brought the file in
    assert not marker.exists()


# ------------------------------------------------------------------ files that are not ours


def tiny_meta() -> dict:
    return model_meta("unet", {"num_classes": 3, "base_width": 4, "bilinear": True}, ["a", "b", "c"],
                      [32, 32], [0.5] * 3, [0.25] * 3)


@pytest.mark.parametrize("content", [
    {"state_dict": {"w": torch.ones(2)}, "meta": {}},  # no "model"
    {"model": {"w": torch.ones(2)}},  # no "meta"
    {"model": {"w": torch.ones(2)}, "meta": ["unet"]},  # "meta" that is no dict
    {"w": torch.ones(2)},  # a bare state dict
    [torch.ones(2)],  # not even a dict
], ids=["no-model", "no-meta", "meta-not-a-dict", "bare-state-dict", "list"])
def test_a_file_without_model_and_meta_is_refused(tmp_path, content):
    path = tmp_path / "foreign.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="is not a checkpoint of this project"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is not a checkpoint of this project"):
        Predictor.from_checkpoint(path, device="cpu")


def test_missing_metadata_keys_are_named(tmp_path):
    meta = tiny_meta()
    del meta["input_size"], meta["std"]
    path = tmp_path / "partial.pth"
    torch.save({"model": build_model("unet", **tiny_meta()["arch_args"]).state_dict(), "meta": meta}, path)
    with pytest.raises(CheckpointError, match=r"lacks metadata: input_size, std$"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"lacks metadata: input_size, std$"):
        load_model(path, torch.device("cpu"))


def test_a_missing_or_corrupt_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a zip archive nor a pickle")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pth")


def test_pretrained_weights_that_are_no_state_dict_are_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="holds no state dict of tensors"):
        load_pretrained(build_model("unet", num_classes=3, base_width=4), str(path))
