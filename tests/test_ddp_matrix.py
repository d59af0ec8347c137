"""Every registry architecture, and every option that changes which parameters learn, trains under
torchrun (2 processes, gloo): one launch of tests/ddp_matrix.py runs them all, one step an epoch,
then train.py's own main, then test.py, whose two processes must count what one process counts."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test as test_script
from model.deeplab_voc import DeepLabV3VOC
from model.registry import ARCHITECTURES
from tests.conftest import ROOT
from tests.ddp_matrix import configurations
from tests.synthetic_coco import make_training_root
from tests.tiny_checkpoint import make_checkpoint
from utils.classes import COCO_CLASSES

NAMES = list(configurations("weights", "counts"))
EPOCHS = {"smp_unet_frozen_encoder": 2}


def evaluation_args(root: Path, save: Path) -> list[str]:
    """test.py on a random U-Net that calls pixels of many classes, over the training images."""
    return ["--checkpoint", str(root / "tiny.pth"), "--workers", "0", "--device", "cpu", "--data-dir", str(root),
            "--mask-dir", str(root / "masks"), "--val-split", "train2017", "--save-dir", str(save)]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    # Four images: 2 ranks of one batch of 2, one step an epoch, which is what "the same weights on
    # every rank" needs (a step's gradients all-reduced); more images only cost time.
    root = make_training_root(tmp_path_factory.mktemp("ddp"), num_images=4, size=(40, 48), seed=2, max_objects=3)
    torch.manual_seed(0)
    weights = root / "voc.pth"  # random, in the DeepLab file's layout: an encoder, a VOC head, a teacher
    torch.save({k.removeprefix("head."): v for k, v in DeepLabV3VOC().state_dict().items()}, weights)
    make_checkpoint(root / "tiny.pth", class_names=list(COCO_CLASSES), varied=True)
    out = root / "matrix.json"
    common = ["--data-dir", str(root), "--mask-dir", str(root / "masks"), "--save-dir", str(root / "save"),
              "--train-split", "train2017", "--val-split", "train2017", "--crop-size", "32", "--batch-size", "2",
              "--workers", "0", "--device", "cpu", "--epochs", "1"]
    train_py = [*common, "--model", "unet", "--base-width", "4", "--epochs", "2", "--save-dir", str(root / "train_py")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.ddp_matrix", str(out), str(weights), str(root / "masks" / "train2017" / "conversion.json"),
               *NAMES, "--", *common, "--", *train_py, "--", *evaluation_args(root, root / "two")]
    # One thread each: two processes share the cores, and more threads would only wait on each other.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0 and out.exists(), result.stderr[-3000:]
    return {**json.loads(out.read_text()), "root": root}


def test_the_matrix_covers_every_registry_architecture():
    covered = {configurations("w", "c")[name][1] for name in NAMES}
    assert covered == set(ARCHITECTURES)


@pytest.mark.parametrize("name", NAMES)
def test_trains_under_torchrun_with_the_same_weights_on_every_rank(matrix, name):
    result = matrix[name]
    assert "error" not in result, result["error"]
    assert result["world_size"] == 2
    assert [row["epoch"] for row in result["rows"]] == list(range(1, EPOCHS.get(name, 1) + 1))
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) for row in result["rows"])
    assert result["same_on_every_rank"]


def test_a_frozen_encoder_learns_only_after_its_epochs(matrix):
    assert matrix["smp_unet_frozen_encoder"]["encoder_changed"] == [False, True]


def test_train_py_itself_trains_under_torchrun(matrix):
    """train.py's main (its options, set-up, epochs and rank 0's saving), the later --epochs and
    --save-dir winning over the matrix's."""
    assert matrix["train.py"] == {"code": 0}
    with open(matrix["root"] / "train_py" / "log_train.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2]
    assert (matrix["root"] / "train_py" / "model_final.pth").exists()


def test_test_py_under_torchrun_counts_what_one_process_counts(matrix):
    assert matrix["test.py"] == {"code": 0}
    root = matrix["root"]
    assert test_script.main(evaluation_args(root, root / "one")) == 0
    two = json.loads((root / "two" / "metrics.json").read_text())
    one = json.loads((root / "one" / "metrics.json").read_text())
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert sum(map(sum, one["confusion_matrix"])) > 0
