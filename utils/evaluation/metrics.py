"""Pixel accuracy, IoU and Dice from a confusion matrix accumulated on the device.

A class is *counted* when it occurs in the ground truth or the predictions.  A class that
occurs in neither has no IoU (None: undefined, not 0) and stays out of the means, so the
COCO ids that are never used cannot drag mIoU down.
"""
from __future__ import annotations

import numpy as np
import torch

from utils import distributed
from utils.classes import IGNORE_INDEX


class ConfusionMatrix:
    """``matrix[true, predicted]`` pixel counts over ``num_classes`` classes."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 device: str | torch.device | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Count each pixel of ``target`` (class ids or ignore) against ``prediction`` (class ids)."""
        target, prediction = target.reshape(-1).long(), prediction.reshape(-1).long()
        cells = self.num_classes ** 2
        # Ignored pixels go to one extra bin that is dropped: no boolean indexing, no host sync.
        index = torch.where(target != self.ignore_index, target * self.num_classes + prediction, cells)
        counts = torch.bincount(index.to(self.matrix.device), minlength=cells + 1)
        self.matrix += counts[:cells].reshape(self.num_classes, self.num_classes)

    def reduce_from_all_processes(self) -> None:
        """Sum the counts of every process, when running distributed."""
        distributed.all_reduce_sum(self.matrix)

    def compute(self) -> dict:
        """Plain-Python metrics (JSON-ready); per-class lists are indexed by class id."""
        matrix = self.matrix.cpu().numpy()
        true_positive = np.diag(matrix)
        support = matrix.sum(axis=1)
        predicted = matrix.sum(axis=0)
        counted = np.flatnonzero(support + predicted)
        iou = ratios(true_positive, support + predicted - true_positive)
        dice = ratios(2 * true_positive, support + predicted)
        class_accuracy = ratios(true_positive, support)
        total = int(matrix.sum())
        return {
            "pixel_accuracy": float(true_positive.sum() / total) if total else None,
            "miou": mean_of_defined(iou),
            "mean_dice": mean_of_defined(dice),
            "iou": iou,
            "dice": dice,
            "class_accuracy": class_accuracy,
            "support": support.tolist(),
            "classes_counted": counted.tolist(),
        }

    def __str__(self) -> str:
        metrics = self.compute()
        per_class = " ".join(f"{class_id}:{metrics['iou'][class_id]:.3f}" for class_id in metrics["classes_counted"])
        return (f"pixel accuracy {format_optional(metrics['pixel_accuracy'])}, "
                f"mIoU {format_optional(metrics['miou'])} over {len(metrics['classes_counted'])} classes, "
                f"mean Dice {format_optional(metrics['mean_dice'])}\nIoU per class id: {per_class}")


def ratios(numerators: np.ndarray, denominators: np.ndarray) -> list[float | None]:
    """Element-wise ratios, None where the denominator is 0."""
    return [float(n / d) if d else None for n, d in zip(numerators, denominators, strict=True)]


def mean_of_defined(values: list[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else None


def format_optional(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
