"""train.py, test.py and test_draw.py end to end on a tiny synthetic COCO set (CPU)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test as test_script
import test_draw
import train
from tests.conftest import ROOT
from tests.synthetic_coco import make_training_root
from utils.checkpoint import load_checkpoint

TINY = ["--model", "unet", "--base-width", "8", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
        "--train-split", "train2017", "--val-split", "train2017"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """12 synthetic images with their masks, in the layout train.py expects."""
    return make_training_root(tmp_path_factory.mktemp("train"), num_images=12, size=(64, 80), seed=1, max_objects=3)


def data_args(root: Path, save: Path) -> list[str]:
    return ["--data-dir", str(root), "--mask-dir", str(root / "masks"), "--save-dir", str(save)]


def read_log(save: Path) -> list[dict]:
    with open(save / "log_train.csv") as handle:
        return list(csv.DictReader(handle))


OVERFIT_EPOCHS = 50  # at lr 0.02 the mIoU ends near 0.87 (0.74 after 40 epochs)


@pytest.fixture(scope="module")
def trained(coco_root, tmp_path_factory) -> Path:
    """A U-Net overfitted on the synthetic set: the tests below read its outputs."""
    save = tmp_path_factory.mktemp("save")
    code = train.main(data_args(coco_root, save) + TINY + [
        "--epochs", str(OVERFIT_EPOCHS), "--lr", "0.02", "--loss", "ce", "--val-every", "25"])
    assert code == 0
    return save


def test_training_really_learns(trained):
    rows = read_log(trained)
    assert [int(r["epoch"]) for r in rows] == list(range(1, OVERFIT_EPOCHS + 1))
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    assert float(rows[-1]["miou"]) > 0.75, rows[-1]


def test_checkpoints_carry_metadata_and_state(trained):
    for name in ("last.pth", "best.pth", "model_final.pth"):
        checkpoint = load_checkpoint(trained / name)
        meta = checkpoint["meta"]
        assert meta["arch"] == "unet" and meta["arch_args"]["base_width"] == 8
        assert meta["num_classes"] == 91 and meta["class_names"][1] == "person"
        assert meta["input_size"] == [64, 64] and len(meta["mean"]) == 3
        assert checkpoint["config"]["augment"] == "basic" and checkpoint["config"]["base_width"] == 8
    last = load_checkpoint(trained / "last.pth")
    assert last["epoch"] == OVERFIT_EPOCHS and {"optimizer", "scheduler", "scaler", "config"} <= last.keys()
    assert last["meta"]["metrics"]["miou"] == pytest.approx(float(read_log(trained)[-1]["miou"]))
    assert (trained / "curves.png").stat().st_size > 0


def test_test_py_agrees_with_independent_computation(trained, coco_root, tmp_path):
    predictions = tmp_path / "pred"
    code = test_script.main(["--checkpoint", str(trained / "model_final.pth"), "--batch-size", "4",
                             "--workers", "0", "--val-split", "train2017", "--save-predictions", str(predictions),
                             "--rank-images", "2"] + data_args(coco_root, tmp_path))
    assert code == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    intersection, union, correct, valid = np.zeros(91), np.zeros(91), 0, 0
    per_image = {}
    for mask_file in sorted((coco_root / "masks" / "train2017").glob("*.npy")):
        truth = np.load(mask_file)
        prediction = np.asarray(Image.open(predictions / f"{mask_file.stem}.png"))
        assert prediction.shape == truth.shape
        keep = truth != 255
        t, p = truth[keep].astype(int), prediction[keep].astype(int)
        correct, valid = correct + (t == p).sum(), valid + keep.sum()
        image_ious = []
        for c in range(91):
            both, either = ((t == c) & (p == c)).sum(), ((t == c) | (p == c)).sum()
            intersection[c] += both
            union[c] += either
            if either:
                image_ious.append(both / either)
        per_image[f"{mask_file.stem}.jpg"] = np.mean(image_ious)
    present = union > 0
    assert report["pixel_accuracy"] == pytest.approx(correct / valid)
    assert report["miou"] == pytest.approx((intersection[present] / union[present]).mean())
    assert sorted(report["classes_counted"]) == np.flatnonzero(present).tolist()
    assert "mIoU" in (tmp_path / "log_test.log").read_text()
    assert "person" in (tmp_path / "log_test.log").read_text()
    assert Image.open(tmp_path / "vision_confusion_matrix.jpg").size[0] > 500
    rows = [line.split(",") for line in (tmp_path / "per_image_iou.csv").read_text().splitlines()[1:]]
    assert len(rows) == 12 and all(float(score) == pytest.approx(per_image[name], abs=1e-5) for name, score in rows)
    assert [float(score) for _, score in rows] == sorted(float(score) for _, score in rows)
    drawn = sorted(p.name for p in (tmp_path / "best_worst").glob("*.jpg"))
    assert len(drawn) == 4 and drawn[0].startswith("best_01_" + Path(rows[-1][0]).stem)


def test_test_draw_draws_and_times(trained, coco_root, tmp_path):
    common = ["--checkpoint", str(trained / "model_final.pth"), "--val-split", "train2017"] + data_args(
        coco_root, tmp_path)
    assert test_draw.main(["draw", "--count", "3"] + common) == 0
    panels = sorted((tmp_path / "draw").glob("*.jpg"))
    assert len(panels) == 6 and {p.name.split("_")[0] for p in panels} == {"train", "val"}
    assert Image.open(panels[0]).width > 3 * 60  # three panels side by side
    assert test_draw.main(["compute_time", "--count", "5", "--warmup", "1"] + common) == 0
    assert "median" in (tmp_path / "compute_time.txt").read_text()


def mark_saved_rows(save: Path, last_epoch: int) -> list[dict]:
    """Stamp an impossible duration on the log rows up to ``last_epoch`` and return them: a
    resumed run that trained those epochs again would rewrite them, and the stamp would go."""
    rows = read_log(save)
    for row in rows:
        if int(row["epoch"]) <= last_epoch:
            row["seconds"] = "9999.9"
    with open(save / "log_train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return [row for row in rows if int(row["epoch"]) <= last_epoch]


def test_resume_after_kill_completes_the_run(coco_root, tmp_path):
    command = [sys.executable, "train.py", *data_args(coco_root, tmp_path), *TINY, "--epochs", "4"]
    # One thread: on a CPU shared with other jobs, two threads wait on each other at every small op.
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=environment)
    deadline = time.monotonic() + 120
    while not (tmp_path / "last.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_epoch = load_checkpoint(tmp_path / "last.pth")["epoch"]
    assert saved_epoch < 4
    before = mark_saved_rows(tmp_path, saved_epoch)
    assert train.main(data_args(coco_root, tmp_path) + TINY + ["--epochs", "4", "--resume"]) == 0  # in this process
    last = load_checkpoint(tmp_path / "last.pth")
    assert last["epoch"] == 4
    rows = read_log(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert rows[:saved_epoch] == before  # epochs already saved are neither retrained nor relogged
    assert all(row["seconds"] != "9999.9" for row in rows[saved_epoch:])
    load_checkpoint(tmp_path / "model_final.pth")
    # The schedule continues where it stopped: the same learning rates as a run never interrupted.
    assert train.main(data_args(coco_root, tmp_path / "whole") + TINY + ["--epochs", "4"]) == 0
    assert [r["lr"] for r in rows] == [r["lr"] for r in read_log(tmp_path / "whole")]
    assert len({r["lr"] for r in rows}) == 4


def test_resume_with_another_architecture_is_refused(trained, coco_root, tmp_path, capsys):
    shutil.copy(trained / "last.pth", tmp_path / "last.pth")
    code = train.main(data_args(coco_root, tmp_path) + TINY[:2] + ["--base-width", "16"] + TINY[4:]
                      + ["--epochs", "120", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "use the same model options" in err and "Traceback" not in err


def test_bad_data_gives_a_clear_message(coco_root, tmp_path, capsys):
    assert train.main(data_args(tmp_path / "nowhere", tmp_path) + TINY + ["--epochs", "1"]) == 2
    assert "image folder not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(coco_root, broken)
    first = sorted((broken / "masks" / "train2017").glob("*.npy"))[0]
    mask = np.load(first)
    mask[0, 0] = 200
    np.save(first, mask)
    assert train.main(data_args(broken, tmp_path) + TINY + ["--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "outside 0..90" in err and "Traceback" not in err


def test_cuda_path_runs_where_cuda_exists(coco_root, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: AMP / cudnn.benchmark path not exercised")
    assert train.main(data_args(coco_root, tmp_path) + TINY + ["--epochs", "1", "--device", "cuda"]) == 0
