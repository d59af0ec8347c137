"""train.py's --class-weights: the converter's pixel counts become the loss's class weights
(focal alpha, cross-entropy weight) in the mode --class-weight-mode names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from tests.test_losses import IGNORE, focal_by_hand, logits_and_target
from utils.training.prepare import make_criterion

COUNTS = [1600, 0, 400, 100]  # the median of the seen counts (100, 400, 1600) is 400
WEIGHTS = {  # by hand: median / count, and its square root; an unseen class weighs 0
    "median_frequency": [0.25, 0.0, 1.0, 4.0],
    "sqrt_median_frequency": [0.5, 0.0, 1.0, 2.0],
}


def criterion(tmp_path: Path, *options: str) -> torch.nn.Module:
    """The loss train.py builds from ``options`` and a conversion.json holding COUNTS."""
    counts_file = tmp_path / "conversion.json"
    counts_file.write_text(json.dumps({"class_pixel_counts": COUNTS}))
    args = train.parse_args(["--class-weights", str(counts_file), *options])
    return make_criterion(args, len(COUNTS), torch.device("cpu"))


@pytest.mark.parametrize("mode", sorted(WEIGHTS))
def test_class_weights_are_the_focal_alpha(tmp_path, mode):
    focal = criterion(tmp_path, "--loss", "focal", "--focal-gamma", "2", "--class-weight-mode", mode)
    logits, target = logits_and_target(seed=6)
    expected = focal_by_hand(logits, target, WEIGHTS[mode], 2.0)
    assert focal(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_without_class_weights_the_focal_alpha_is_the_option():
    args = train.parse_args(["--loss", "focal", "--focal-alpha", "0.25", "--focal-gamma", "2"])
    focal = make_criterion(args, len(COUNTS), torch.device("cpu"))
    logits, target = logits_and_target(seed=7)
    assert focal(logits, target).item() == pytest.approx(focal_by_hand(logits, target, 0.25, 2.0), rel=1e-5)


def test_class_weights_weigh_cross_entropy(tmp_path):
    cross_entropy = criterion(tmp_path, "--loss", "ce")
    logits, target = logits_and_target(seed=8)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(WEIGHTS["median_frequency"]),
                               ignore_index=IGNORE)
    assert cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
