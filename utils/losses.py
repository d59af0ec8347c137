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


def cross_entropy_loss(weight: torch.Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """Cross entropy with optional class weights; ignores our ignore label, not PyTorch's -100."""
    return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "focal": FocalLoss,
    "ce": cross_entropy_loss,
}


def build_loss(name: str, **kwargs) -> nn.Module:
    """The loss ``name`` ("focal" or "ce") built with ``kwargs``."""
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
