"""Shared fixtures: synthetic COCO data made per session, and the optional ../shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.synthetic_coco import SyntheticCoco, make_coco

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per test process: the suite runs a process per core (pytest -n auto), and
    # two processes of two threads each on two cores would only preempt each other.
    torch.set_num_threads(1)


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
    return make_coco(tmp_path_factory.mktemp("coco"), num_images=8)
