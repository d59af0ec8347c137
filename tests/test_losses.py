"""Focal loss against cross entropy and a per-pixel formula; loss building; class weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.training.losses import FocalLoss, build_loss, class_weights_from_counts

IGNORE = 255


def logits_and_target(seed: int = 0, classes: int = 4, shape=(2, 5, 7), ignored: float = 0.2):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape[0], classes, *shape[1:], generator=generator)
    target = torch.randint(0, classes, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < ignored] = IGNORE
    return logits, target


def focal_by_hand(logits: torch.Tensor, target: torch.Tensor, alpha, gamma: float) -> float:
    """The textbook formula, one pixel at a time."""
    logits, target = logits.double().numpy(), target.numpy()
    total, pixels = 0.0, 0
    for n, row, col in np.ndindex(*target.shape):
        label = target[n, row, col]
        if label == IGNORE:
            continue
        scores = logits[n, :, row, col]
        p = math.exp(scores[label]) / sum(math.exp(s) for s in scores)
        weight = alpha[label] if isinstance(alpha, list) else alpha
        total += -weight * (1 - p) ** gamma * math.log(p)
        pixels += 1
    return total / pixels


def test_focal_with_gamma_0_and_alpha_1_is_cross_entropy():
    logits, target = logits_and_target()
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    assert FocalLoss(alpha=1.0, gamma=0.0)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.9, 4.0), (1.0, 0.5), ([0.5, 2.0, 0.0, 1.5], 2.0)])
def test_focal_matches_the_per_pixel_formula(alpha, gamma):
    logits, target = logits_and_target(seed=1)
    focal = FocalLoss(alpha=torch.tensor(alpha) if isinstance(alpha, list) else alpha, gamma=gamma)
    assert focal(logits, target).item() == pytest.approx(focal_by_hand(logits, target, alpha, gamma), rel=1e-5)


def test_logits_at_ignored_pixels_change_neither_loss_nor_gradient():
    logits, target = logits_and_target(seed=2, ignored=0.5)
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    changed = torch.where(ignored, 100 * torch.randn_like(logits), logits)
    focal = FocalLoss()
    assert focal(changed, target).item() == focal(logits, target).item()

    logits.requires_grad_(True)
    focal(logits, target).backward()
    assert (logits.grad[ignored] == 0).all()
    assert (logits.grad[~ignored] != 0).any()


def test_all_ignored_gives_zero_and_finite_gradients():
    logits, _ = logits_and_target()
    logits.requires_grad_(True)
    target = torch.full((2, 5, 7), IGNORE)
    loss = FocalLoss()(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_confident_correct_pixels_give_finite_gradients():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 1] = 200.0  # p_t is 1 to float precision
    logits.requires_grad_(True)
    loss = FocalLoss(gamma=2.0)(logits, torch.ones(1, 1, 2, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_per_class_alpha_weighs_each_pixel_by_its_class():
    logits, target = logits_and_target(seed=3, ignored=0.0)
    only_class_2 = torch.tensor([0.0, 0.0, 1.0, 0.0])
    loss = FocalLoss(alpha=only_class_2, gamma=0.0)(logits, target)
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    assert loss.item() == pytest.approx((per_pixel * (target == 2)).sum().item() / target.numel(), rel=1e-6)


def test_per_class_alpha_must_cover_every_class():
    logits, target = logits_and_target()
    with pytest.raises(ValueError, match="3 class weights for 4 classes"):
        FocalLoss(alpha=torch.ones(3))(logits, target)


def test_half_precision_logits_give_a_float32_loss():
    logits, target = logits_and_target(seed=4)
    loss = FocalLoss(alpha=0.9, gamma=2.0)(logits.half(), target)
    assert loss.dtype == torch.float32
    # The formula on the fp16-rounded logits: computed in float32, the loss loses nothing more.
    assert loss.item() == pytest.approx(focal_by_hand(logits.half().float(), target, 0.9, 2.0), rel=1e-5)


def test_build_loss_makes_focal_and_cross_entropy_ignoring_255():
    logits, target = logits_and_target(seed=5)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    focal = build_loss("focal", alpha=0.5, gamma=2.0)
    assert isinstance(focal, FocalLoss) and focal.gamma == 2.0
    cross_entropy = build_loss("ce", weight=weight)
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    assert cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_build_loss_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*ce, ce_dice, dice, focal"):
        build_loss("hinge")


def test_median_frequency_weights():
    counts = [0] * 91
    counts[0], counts[1], counts[18], counts[44] = 1000, 100, 400, 50
    weights = class_weights_from_counts(counts)
    assert weights.shape == (91,) and weights.dtype == torch.float32
    # median of the seen counts (50, 100, 400, 1000) is 250
    assert weights[[0, 1, 18, 44]].tolist() == pytest.approx([0.25, 2.5, 0.625, 5.0])
    assert weights.count_nonzero().item() == 4


def test_sqrt_median_frequency_weights_are_square_roots_of_median_frequency():
    counts = [1600, 0, 400, 100, 25]  # median of the seen counts (25, 100, 400, 1600) is 250
    weights = class_weights_from_counts(counts, mode="sqrt_median_frequency")
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([math.sqrt(250 / 1600), 0.0, math.sqrt(250 / 400),
                                              math.sqrt(250 / 100), math.sqrt(250 / 25)])


def test_inverse_frequency_weights_average_one_over_pixels():
    counts = torch.tensor([600, 0, 300, 100])
    weights = class_weights_from_counts(counts.tolist(), mode="inverse_frequency")
    assert weights.tolist() == pytest.approx([1000 / 1800, 0.0, 1000 / 900, 1000 / 300])
    assert (weights * counts).sum().item() / counts.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("counts, mode, message", [
    ([0, 0, 0], "median_frequency", "no class has any pixel"),
    ([1, -1], "median_frequency", "non-negative"),
    ([1, 2], "sqrt", "unknown class weight mode 'sqrt'"),
])
def test_class_weights_reject_bad_input(counts, mode, message):
    with pytest.raises(ValueError, match=message):
        class_weights_from_counts(counts, mode=mode)


def direct_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> float:
    """Dice loss written out pixel by pixel with numpy, for comparison."""
    probabilities = torch.softmax(logits, 1).numpy()
    labels = target.numpy()
    scores = []
    for c in range(logits.shape[1]):
        overlap = size_p = size_t = 0.0
        for n, y, x in np.ndindex(*labels.shape):
            if labels[n, y, x] == 255:
                continue
            p, t = probabilities[n, c, y, x], float(labels[n, y, x] == c)
            overlap, size_p, size_t = overlap + p * t, size_p + p, size_t + t
        if size_t > 0:
            scores.append((2 * overlap + smooth) / (size_p + size_t + smooth))
    return 1 - float(np.mean(scores))


def test_dice_loss_matches_direct_formula_and_ignores_255():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 3, (2, 5, 6))  # class 3 absent: it must not count
    target[0, 0, :3] = 255
    loss = build_loss("dice")(logits, target)
    assert loss.item() == pytest.approx(direct_dice_loss(logits, target), rel=1e-5)
    changed = logits.clone()
    changed[0, :, 0, :3] += 10  # only ignored pixels change
    assert build_loss("dice")(changed, target).item() == pytest.approx(loss.item(), rel=1e-6)
    perfect = torch.nn.functional.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 50
    assert build_loss("dice")(perfect, target).item() < 1e-3


def test_ce_dice_is_the_sum_and_all_ignored_is_zero():
    torch.manual_seed(4)
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (1, 4, 4))
    combined = build_loss("ce_dice")(logits, target)
    expected = F.cross_entropy(logits, target) + build_loss("dice")(logits, target)
    assert combined.item() == pytest.approx(expected.item(), rel=1e-6)
    ignored = build_loss("ce_dice")(logits, torch.full((1, 4, 4), 255))
    ignored.backward()
    assert ignored.item() == 0 and logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="not to dice"):
        build_loss("dice", weight=torch.ones(3))
