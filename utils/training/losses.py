"""Segmentation losses over N x C x H x W logits and N x H x W int64 targets (255 = ignore)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.classes import IGNORE_INDEX


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al., 2017): ``-alpha_t (1 - p_t)^gamma log p_t``,
    averaged over the pixels that are not ``ignore_index`` (0 when there are none).

    ``alpha`` is one factor for every class or a per-class weight tensor.  Unlike
    ``F.cross_entropy(weight=...)``, the mean is over pixels, not over their weights.
    With ``gamma=0`` and ``alpha=1`` it is plain cross entropy.
    """

    def __init__(self, alpha: float | torch.Tensor = 0.9, gamma: float = 4.0,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.gamma = gamma
        self.ignore_index = ignore_index
        # A buffer, so a per-class alpha follows the module to its device.
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.alpha.ndim == 1 and self.alpha.numel() != logits.shape[1]:
            raise ValueError(f"focal loss has {self.alpha.numel()} class weights for {logits.shape[1]} classes")
        valid = target != self.ignore_index
        # Ignored pixels look up class 0 and are then zeroed, so the gather never goes out of range.
        safe_target = torch.where(valid, target, 0)
        # float32 even under autocast: log of fp16 probabilities underflows.
        log_p_t = F.log_softmax(logits.float(), dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        alpha_t = self.alpha[safe_target] if self.alpha.ndim == 1 else self.alpha
        loss = -alpha_t * (1 - log_p_t.exp()).pow(self.gamma) * log_p_t
        return torch.where(valid, loss, 0).sum() / valid.sum().clamp(min=1)


class CrossEntropy(nn.Module):
    """Cross entropy with optional class weights, ignoring our ignore label (not PyTorch's -100).

    The same weighted mean as ``nn.CrossEntropyLoss``, except that a batch whose pixels are
    all ignored gives 0 rather than NaN (which would poison the weights through Adam).
    """

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index,
                                reduction="sum")
        valid = target != self.ignore_index
        if self.weight is None:
            denominator = valid.sum()
        else:
            denominator = self.weight[torch.where(valid, target, 0)][valid].sum()
        # No weight, no pixel: total is then exactly 0, so the clamp gives 0 without a host sync.
        return total / denominator.clamp(min=1e-12)


def cross_entropy_loss(weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    return CrossEntropy(weight, ignore_index)


class DiceLoss(nn.Module):
    """Soft multi-class Dice loss: ``1 - mean_c (2 sum p_c t_c + s) / (sum p_c + sum t_c + s)``
    over the non-ignored pixels of the batch, averaged over the classes present in the target
    (a class absent from the batch would otherwise count as a free perfect score)."""

    def __init__(self, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != self.ignore_index).unsqueeze(1)
        probabilities = F.softmax(logits.float(), dim=1) * valid
        one_hot = F.one_hot(torch.where(valid.squeeze(1), target, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
        dims = (0, 2, 3)
        overlap = (probabilities * one_hot).sum(dims)
        sizes = probabilities.sum(dims) + one_hot.sum(dims)
        dice = (2 * overlap + self.smooth) / (sizes + self.smooth)
        present = one_hot.sum(dims) > 0
        mean_dice = (dice * present).sum() / present.sum().clamp(min=1)
        # Masked, not branched on: a truth test on a tensor waits for the GPU.  All ignored gives 0.
        return (1 - mean_dice) * present.any()


class CrossEntropyDiceLoss(nn.Module):
    """Cross entropy (optionally class-weighted) plus Dice: pixel-wise and region-wise signals."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.cross_entropy = cross_entropy_loss(weight, ignore_index)
        self.dice = DiceLoss(ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(logits.float(), target) + self.dice(logits, target)


def dice_loss(weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """Dice has no class weights (every present class already counts equally)."""
    if weight is not None:
        raise ValueError("--class-weights applies to ce, ce_dice and focal, not to dice")
    return DiceLoss(ignore_index=ignore_index)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "focal": FocalLoss,
    "ce": cross_entropy_loss,
    "dice": dice_loss,
    "ce_dice": CrossEntropyDiceLoss,
}


def build_loss(name: str, **kwargs) -> nn.Module:
    """The loss ``name`` (a key of LOSSES) built with ``kwargs``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)


CLASS_WEIGHT_MODES = ("median_frequency", "sqrt_median_frequency", "inverse_frequency")


def class_weights_from_counts(pixel_counts: Sequence[int], mode: str = "median_frequency") -> torch.Tensor:
    """Per-class loss weights from per-class pixel counts; classes never seen get weight 0.

    ``median_frequency`` (Eigen & Fergus): median count / count, so the median class weighs 1.
    ``inverse_frequency``: total / (classes seen * count), so weights average 1 over the pixels.
    ``sqrt_median_frequency``: the square root of median frequency: rare classes still count
    more, without the hundredfold weights that stall training on small, skewed data.
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("pixel_counts must be a flat list of non-negative counts")
    seen = counts > 0
    if not seen.any():
        raise ValueError("no class has any pixel: cannot derive class weights")
    if mode in ("median_frequency", "sqrt_median_frequency"):
        numerator = np.median(counts[seen])
    elif mode == "inverse_frequency":
        numerator = counts.sum() / seen.sum()
    else:
        raise ValueError(f"unknown class weight mode {mode!r}; known: {', '.join(CLASS_WEIGHT_MODES)}")
    weights = np.zeros_like(counts)
    weights[seen] = numerator / counts[seen]
    if mode == "sqrt_median_frequency":
        weights = np.sqrt(weights)
    return torch.from_numpy(weights).float()
