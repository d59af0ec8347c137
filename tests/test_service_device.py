"""SEG_DEVICE: which device each service worker runs on (app/settings.py, app/gunicorn.conf.py)."""
from __future__ import annotations

import runpy
from types import SimpleNamespace

import pytest
import torch

import app.segmenter
from app import create_app, settings
from app.metrics import WORKER_RESTARTS
from tests.conftest import ROOT


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this host has ``n`` GPUs."""
    monkeypatch.delenv("SEG_DEVICE", raising=False)
    monkeypatch.delenv("SEG_WORKER_INDEX", raising=False)
    return lambda n: monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize(("count", "index", "expected"), [(2, None, "cuda:0"), (2, "3", "cuda:1"), (3, "4", "cuda:1"),
                                                           (0, "3", "cpu")])
def test_worker_i_takes_gpu_i_mod_n_or_the_cpu(gpus, monkeypatch, count, index, expected):
    gpus(count)
    if index is not None:
        monkeypatch.setenv("SEG_WORKER_INDEX", index)
    assert settings.from_environment()["DEVICE"] == expected


@pytest.mark.parametrize("value", ["cpu", "cuda", "cuda:1"])
def test_seg_device_is_obeyed(gpus, monkeypatch, value):
    gpus(2)
    monkeypatch.setenv("SEG_WORKER_INDEX", "0")
    monkeypatch.setenv("SEG_DEVICE", value)
    assert settings.from_environment()["DEVICE"] == value


@pytest.mark.parametrize("value", ["gpu", "cuda:2", "cuda:-1", "cuda0"])
def test_a_device_this_host_lacks_stops_with_one_line(gpus, monkeypatch, value):
    gpus(2)
    monkeypatch.setenv("SEG_DEVICE", value)
    with pytest.raises(SystemExit, match=r"^SEG_DEVICE=.* is not cpu or cuda\[:i\] of the 2 GPU\(s\) here$"):
        settings.from_environment()


def test_gunicorn_numbers_each_worker_from_zero_and_counts_restarts(monkeypatch):
    monkeypatch.setenv("SEG_WORKER_INDEX", "unset")
    hooks = runpy.run_path(str(ROOT / "app" / "gunicorn.conf.py"))
    server = SimpleNamespace(cfg=SimpleNamespace(workers=2))
    restarts = WORKER_RESTARTS._value.get()
    hooks["post_fork"](server, SimpleNamespace(age=2))
    assert settings._int("SEG_WORKER_INDEX", -1) == 1 and WORKER_RESTARTS._value.get() == restarts
    hooks["post_fork"](server, SimpleNamespace(age=3))  # one more than the workers: a replacement
    assert settings._int("SEG_WORKER_INDEX", -1) == 2 and WORKER_RESTARTS._value.get() == restarts + 1


def test_the_worker_loads_its_model_on_the_chosen_device(gpus, monkeypatch, tmp_path):
    gpus(2)
    monkeypatch.setenv("SEG_WORKER_INDEX", "1")
    asked = {}
    monkeypatch.setattr(app.segmenter.Predictor, "from_checkpoint", lambda path, **options: asked.update(options))
    # The stub predictor (None) has nothing to describe to the metrics.
    monkeypatch.setattr(app.segmenter.Segmenter, "_described", lambda self, predictor: {})
    monkeypatch.setattr(app.segmenter.metrics, "model_loaded", lambda description: None)
    service = create_app({"RESULTS_DIR": str(tmp_path), "LOAD_MODEL_AT_START": False})
    service.extensions["segmenter"].load()
    assert asked["device"] == "cuda:1"
