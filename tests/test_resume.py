"""resume(): a run saved mid-way and resumed into a fresh run holds the same model, optimiser,
schedule and epoch count as the run that saved it."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import train
from tests.synthetic_coco import make_training_root
from utils import distributed
from utils.training.prepare import Run, prepare
from utils.training.state import resume
from utils.training.train import run_epoch, save_epoch

STEPS_PER_EPOCH = 2  # 4 images, batch size 2


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_training_root(tmp_path_factory.mktemp("resume"), num_images=4, size=(40, 48), seed=4, max_objects=2)


@pytest.fixture()
def prepared(coco_root, tmp_path) -> Iterator:
    """``prepare`` for a 4-epoch tiny run saving into ``tmp_path``; the process group cleaned up after."""
    args = train.parse_args([
        "--data-dir", str(coco_root), "--mask-dir", str(coco_root / "masks"), "--save-dir", str(tmp_path),
        "--train-split", "train2017", "--val-split", "train2017", "--model", "unet", "--base-width", "4",
        "--crop-size", "32", "--batch-size", "2", "--workers", "0", "--epochs", "4", "--lr", "0.01"])
    yield lambda: prepare(args)
    distributed.cleanup()


def assert_same(actual, expected, where: str = "") -> None:
    """Nested dicts / lists / tensors equal, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (left, right) in enumerate(zip(actual, expected, strict=True)):
            assert_same(left, right, f"{where}[{index}]")
    else:
        assert actual == expected, where


def train_two_epochs(run: Run) -> None:
    for epoch in (1, 2):
        save_epoch(run, epoch, run_epoch(run, epoch))


def one_step(run: Run) -> None:
    """One optimiser and schedule step on a fixed batch."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, 4, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    run.bare_model.train()
    run.optimizer.zero_grad()
    run.criterion(run.bare_model(images), masks).backward()
    run.optimizer.step()
    run.scheduler.step()


def test_resume_restores_model_optimiser_schedule_and_epoch(prepared, tmp_path):
    saved = prepared()
    train_two_epochs(saved)  # writes last.pth after epoch 2
    fresh = prepared()
    # Guard: a fresh run differs from the saved one in everything resume must restore.
    assert not torch.equal(fresh.bare_model.state_dict()["outc.weight"], saved.bare_model.state_dict()["outc.weight"])
    assert fresh.optimizer.state_dict()["state"] == {} and fresh.scheduler.last_epoch == 0

    resume(fresh, tmp_path / "last.pth")

    assert_same(fresh.bare_model.state_dict(), saved.bare_model.state_dict(), "model")
    assert_same(fresh.optimizer.state_dict(), saved.optimizer.state_dict(), "optimizer")
    assert_same(fresh.scheduler.state_dict(), saved.scheduler.state_dict(), "scheduler")
    assert fresh.scheduler.last_epoch == 2 * STEPS_PER_EPOCH
    assert fresh.scheduler.get_last_lr() == saved.scheduler.get_last_lr() != [0.01]
    assert fresh.optimizer.param_groups[0]["lr"] == saved.optimizer.param_groups[0]["lr"]
    assert_same(fresh.scaler.state_dict(), saved.scaler.state_dict(), "scaler")
    assert fresh.start_epoch == 3
    assert fresh.best_metric == saved.best_metric is not None
    assert fresh.last_metrics == saved.last_metrics and fresh.last_metrics["miou"] is not None
    # The restored state is the one in use: the next Adam step moves both runs alike.
    one_step(saved)
    one_step(fresh)
    assert_same(fresh.bare_model.state_dict(), saved.bare_model.state_dict(), "model after a step")


def test_resume_skips_the_empty_scaler_state_of_a_run_without_loss_scaling(prepared, tmp_path):
    """A CPU, fp32 or bf16 run saves the disabled scaler's {}; a CUDA fp16 resume must not load it."""
    train_two_epochs(prepared())
    fresh = prepared()
    fresh.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, enabled=True)  # as on CUDA with fp16
    resume(fresh, tmp_path / "last.pth")
    assert fresh.scaler.get_scale() == 8.0 and fresh.start_epoch == 3


def test_resume_restores_an_enabled_scaler(prepared, tmp_path):
    saved = prepared()
    saved.scaler = torch.amp.GradScaler("cpu", init_scale=4.0, enabled=True)
    train_two_epochs(saved)
    fresh = prepared()
    fresh.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, enabled=True)
    resume(fresh, tmp_path / "last.pth")
    assert fresh.scaler.get_scale() == saved.scaler.get_scale() != 8.0
