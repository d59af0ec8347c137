"""Shared fixtures: synthetic COCO data made per session, the optional ../shared data, and the
service's test client over a tiny checkpoint."""
from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from utils.garbage import freeze_survivors

if TYPE_CHECKING:
    from tests.synthetic_coco import SyntheticCoco

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights"

# The service's default backend is OpenVINO on the CPU (SEG_BACKEND=auto), which converts each new
# checkpoint once: the app tests, each on checkpoints of their own, run on torch unless they ask
# (tests/test_openvino.py serves on OpenVINO, in a test client and under gunicorn).
os.environ.setdefault("SEG_BACKEND", "torch")
# OpenVINO collects usage telemetry by default: every model conversion forked the test process 48
# times to post to Google Analytics (25 s of a 2-minute run of its test files, AVX2 EPYC). Tests
# never use the network; OpenVINO's own switch for test jobs turns it off, here and in the servers
# the tests start.
os.environ.setdefault("CI", "true")

# torch and what imports it load in the test processes only: under pytest-xdist the controlling
# process, which reads this file first, starts the workers that much sooner (1.4 s here, AMD EPYC).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # One torch thread per test process: the suite runs a process per core (pytest -n auto), and
    # two processes of two threads each on two cores would only preempt each other.
    torch.set_num_threads(1)

# The freezes of the two hooks below leave almost nothing in the collector's oldest generation,
# so CPython's rule that a full pass waits until a quarter of it is new no longer holds one back:
# each test file's compile and export caches drew 28 full passes (7.2 s of 83 s for the ONNX
# export and predictor tests in one process, AMD EPYC avx512_bf16). Young passes every 50 000
# allocations and full ones in practice only at file ends (freeze_survivors): that run 75.2 s,
# the whole suite 5 % faster side by side (bench/README.md).
gc.set_threshold(50_000, 20, 100)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collection imports torch, torchvision, SMP and the rest: half a million objects, over which
    the garbage collector ran ten full passes (1.4 s of each worker).  One pass at the end frees
    the imports' garbage; what is left lives as long as the process, so the collector leaves it out
    (gc.freeze) of its passes during the tests too."""
    gc.disable()
    try:
        return (yield)
    finally:
        freeze_survivors()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After a test file, once its module fixtures and the last test's arguments are released: one
    full pass, then what survives (torch.compile's and torch.export's caches, mostly) is frozen too,
    and later passes skip it.  A run's full passes: 4.2 + 8.6 s -> 1.9 + 7.7 s of the two workers
    (AMD EPYC avx512_bf16)."""
    try:
        return (yield)
    finally:
        if nextitem is None or nextitem.path != item.path:
            freeze_survivors()


def requires(module: str, reason: str) -> pytest.MarkDecorator:
    """Skip where ``module`` is not installed, found without importing it: a test process imports
    every test file, and ONNX Script or NNCF cost it most of a second each, even where none of
    their tests run."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=reason)


def machine() -> str:
    import torch

    from utils.precision import cpu_description

    return f"machine: {cpu_description()}; torch kernels {torch.backends.cpu.get_cpu_capability()}"


def pytest_sessionfinish(session) -> None:
    """A pytest-xdist worker hands the machine line to the controlling process, which has no torch."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["machine"] = machine()


MACHINE = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """Kept from any worker that finished: one that crashed (no line) must not erase it."""
    line = getattr(node, "workeroutput", {}).get("machine")
    if line:
        node.config.stash[MACHINE] = line


def pytest_terminal_summary(terminalreporter) -> None:
    """The machine, at the end of every run (also under -q): the suite's time is comparable only
    with its CPU's flags."""
    config = terminalreporter.config  # no worker's line (none finished, or no xdist): read here
    terminalreporter.write_line(config.stash[MACHINE] if MACHINE in config.stash else machine())


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/data/<name>``, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the real datasets live in ../shared/data beside the repo)")
    return path


def shared_weights(name: str) -> Path:
    """Path of ``../shared/weights/<name>``, or skip the test with the reason."""
    path = SHARED_WEIGHTS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the pretrained weights live in ../shared/weights beside the repo)")
    return path


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> SyntheticCoco:
    """Eight small images with every annotation kind; read-only for tests."""
    from tests.synthetic_coco import make_coco

    return make_coco(tmp_path_factory.mktemp("coco"), num_images=8)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tests.tiny_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture()
def make_client(tiny_checkpoint, tmp_path):
    """``make_client(**config)``: a test client of the service on the tiny checkpoint, its results
    in the test's own folder."""
    from app import create_app

    def make(**config):
        app = create_app({"CHECKPOINT": str(tiny_checkpoint), "RESULTS_DIR": str(tmp_path / "results"),
                          "TESTING": True, **config})
        return app.test_client()
    return make
