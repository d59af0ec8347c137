"""The robustness corruptions (utils/data/corruptions.py) and test.py through the predictor:
--mode/--tta beside plain whole mode, and --corruptions' report, the same on a rerun."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import test as test_script
from tests.conftest import ROOT
from tests.tiny_checkpoint import make_checkpoint
from utils.data.corruptions import CORRUPTIONS, CorruptionError, corrupt, parse_corruptions, parse_severities
from utils.evaluation.metrics import ConfusionMatrix
from utils.inference.predictor import Predictor
from utils.inference.tiling import Strategy

# The corruptions that draw at random (the others are a fixed function of the image).
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform", "weather_fog", "weather_flare", "weather_rain", "weather_shadow"}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """Smooth gradients with a few hard edges, like a photo at 96 x 128."""
    rows, columns = np.mgrid[0:96, 0:128]
    image = np.stack([columns * 2, rows * 2, (rows + columns)], axis=-1).astype(np.uint8) // 2 + 40
    image[30:60, 40:90] = (200, 60, 40)
    return image


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_the_image_more_at_higher_severity_and_repeats_with_its_seed(name, photo):
    original = photo.copy()
    mild, strong = corrupt(photo, name, 1, seed=3), corrupt(photo, name, 5, seed=3)
    assert np.array_equal(photo, original)  # the input is left alone
    assert mild.shape == strong.shape == photo.shape and mild.dtype == np.uint8
    change = [np.abs(image.astype(int) - photo).mean() for image in (mild, strong)]
    assert 0 < change[0] and not np.array_equal(mild, strong)
    if name != "frost":  # frost dims the image less at severity 1 but lays more ice: no order in pixel distance
        assert change[0] < change[1], change
    assert np.array_equal(corrupt(photo, name, 5, seed=3), strong)
    if name in RANDOM:
        assert not np.array_equal(corrupt(photo, name, 5, seed=4), strong)


def test_severity_zero_is_the_image_and_bad_names_are_one_line_errors(photo):
    assert np.array_equal(corrupt(photo, "fog", 0), photo)
    with pytest.raises(CorruptionError, match="unknown corruption 'smog'"):
        corrupt(photo, "smog", 1)
    with pytest.raises(CorruptionError, match="severity must be 0-5"):
        corrupt(photo, "fog", 6)
    assert parse_corruptions("weather,fog,weather_fog") == ["weather_fog", "weather_flare", "weather_rain",
                                                          "weather_shadow", "fog"]
    assert len(parse_corruptions("imagenet-c")) == 15
    assert parse_severities("2-4") == [2, 3, 4] and parse_severities("5,1") == [1, 5]
    for bad in ("0-5", "x", "6"):
        with pytest.raises(CorruptionError):
            parse_severities(bad)


def noise_folder(root, count: int = 3) -> list[str]:
    """A folder dataset of ``count`` noisy 72 x 100 photos with two-class masks (left half / right half)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / f"{split}_images").mkdir(parents=True)
        (root / f"{split}_masks").mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (72, 100, 3), dtype=np.uint8)).save(
                root / f"{split}_images" / f"{index}.png")
            mask = np.zeros((72, 100), np.uint8)
            mask[:, 50:] = 1
            Image.fromarray(mask).save(root / f"{split}_masks" / f"{index}.png")
    return ["--dataset", "folder", "--data-dir", str(root), "--class-names", "background,water"]


@pytest.fixture(scope="module")
def two_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_class")
    data = noise_folder(root / "data")
    checkpoint = make_checkpoint(root / "tiny.pth", class_names=["background", "water"], varied=True)
    return data, checkpoint, root


def run_test(data: list[str], checkpoint, save_dir, *options: str) -> int:
    return test_script.main([*data, "--checkpoint", str(checkpoint), "--workers", "0", "--save-dir", str(save_dir),
                             "--device", "cpu", *options])


def test_tta_is_scored_beside_plain_whole_mode_as_the_predictor_sees_it(two_class, caplog):
    caplog.set_level(logging.INFO)
    data, checkpoint, root = two_class
    assert run_test(data, checkpoint, root / "tta", "--mode", "slide", "--tile", "48", "--tta", "flip") == 0
    report = json.loads((root / "tta" / "metrics.json").read_text())
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    expected = ConfusionMatrix(2)
    for index in range(3):
        image = Image.open(root / "data" / "val_images" / f"{index}.png")
        mask = np.asarray(Image.open(root / "data" / "val_masks" / f"{index}.png"))
        class_map = predictor.predict(image, Strategy(mode="slide", tile=48, tta="flip")).class_map
        expected.update(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(class_map.astype(np.int64)))
    assert report["miou"] == pytest.approx(expected.compute()["miou"])
    assert report["mode"] == "slide" and report["tta"] == "flip" and report["seconds_per_image"] > 0
    assert report["plain_whole"]["seconds_per_image"] > 0
    assert "mode slide, tta flip: mIoU" in caplog.text and "in plain whole mode" in caplog.text


def test_robustness_report_has_every_corruption_and_severity_and_repeats(two_class):
    data, checkpoint, root = two_class
    options = ["--mode", "whole", "--corruptions", "gaussian_noise,contrast", "--severities", "1,5"]
    assert run_test(data, checkpoint, root / "first", *options) == 0
    assert run_test(data, checkpoint, root / "again", *options) == 0
    first = json.loads((root / "first" / "robustness.json").read_text())
    assert first == json.loads((root / "again" / "robustness.json").read_text())
    assert set(first["corruptions"]) == {"gaussian_noise", "contrast"} and first["target_class"] == "water"
    noise = first["corruptions"]["gaussian_noise"]
    assert set(noise["severities"]) == {"1", "5"}
    assert noise["mean"]["miou"] == pytest.approx(np.mean([s["miou"] for s in noise["severities"].values()]))
    assert noise["relative_miou"] == pytest.approx(noise["mean"]["miou"] / first["clean"]["miou"])
    assert noise["severities"]["5"]["miou"] != first["clean"]["miou"]  # the corruption reached the network
    table = (root / "first" / "robustness.md").read_text()
    assert "| gaussian_noise | IoU water |" in table and "| mean of all | mIoU |" in table
    assert (root / "first" / "robustness_miou.png").stat().st_size > 0


@pytest.mark.parametrize("options, message", [
    (["--corruptions", "fog"], "--corruptions: the predictor's options; pass --mode whole"),
    (["--mode", "whole", "--corruptions", "smog"], "unknown corruption 'smog'"),
    (["--mode", "whole", "--corruptions", "fog", "--severities", "0-9"], "severities must be within 1-5"),
    (["--tta", "flip"], "--tta: the predictor's options"),
    (["--backend", "torch"], "--backend: the predictor's options"),
    (["--mode", "whole", "--seed", "3"], "--seed: only with --corruptions"),
])
def test_bad_robustness_options_are_one_line_errors(two_class, options, message, capsys):
    data, checkpoint, root = two_class
    assert run_test(data, checkpoint, root / "bad", *options) == 2
    assert message in capsys.readouterr().err


def test_test_py_starts_without_kornia_or_torchvision_until_it_corrupts():
    """They take ~4 s of every test.py start (each torchrun rank's too); only --corruptions needs them."""
    code = ("import sys; sys.argv = ['test.py']; import test; "
            "print(sorted({'kornia', 'torchvision'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
