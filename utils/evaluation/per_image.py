"""Per-image scores: each image's mIoU, the ranking from worst to best, and the best and worst drawn.

The predictions of the images that may end up drawn are kept as the evaluation loop passes them,
so drawing needs no second forward pass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils import distributed
from utils.classes import IGNORE_INDEX
from utils.data.datasets import PairedDataset
from utils.drawing import panels
from utils.evaluation.metrics import ConfusionMatrix
from utils.evaluation.plots import plot_per_image_iou
from utils.fileio import atomic_path, write_text


def image_miou(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float | None:
    """Mean IoU over the classes present in this image's truth or prediction (ignore excluded)."""
    valid = truth != IGNORE_INDEX
    matrix = ConfusionMatrix(num_classes)
    matrix.update(torch.from_numpy(truth[valid].astype(np.int64)), torch.from_numpy(prediction[valid]))
    return matrix.compute()["miou"]


def ranked_choice(scores: dict[int, float], count: int) -> dict[str, list[int]]:
    """The ``count`` worst and best images by score; ties go by the order of ``scores``."""
    ranked = sorted(scores, key=scores.get)
    return {"worst": ranked[:count], "best": ranked[::-1][:count]}


class PerImageScores:
    """A sink collecting each image's mIoU, and the predictions of this rank's ``keep`` best and worst
    images: the global best and worst are among the ranks' own, whatever the ties, as the ranking
    breaks ties by rank and then by the order the images came in."""

    def __init__(self, num_classes: int, keep: int) -> None:
        self.num_classes, self.keep = num_classes, keep
        self.scores: dict[int, float] = {}
        self.kept: dict[int, np.ndarray] = {}

    def __call__(self, index: int, prediction: np.ndarray, truth: np.ndarray) -> None:
        score = image_miou(prediction, truth, self.num_classes)
        if score is None:
            return
        self.scores[index] = score
        self.kept[index] = prediction.copy()  # a view would hold the whole batch's predictions
        if len(self.kept) > 2 * self.keep:
            self.kept = {index: self.kept[index] for index in self.extremes()}

    def extremes(self) -> set[int]:
        order = {index: (self.scores[index], place) for place, index in enumerate(self.scores)}
        by_rank = sorted(self.kept, key=order.get)
        return set(by_rank[:self.keep]) | set(by_rank[len(by_rank) - self.keep:])

    def gathered(self) -> dict[int, float]:
        return distributed.gather_dicts(self.scores)

    def gathered_predictions(self, indices: set[int]) -> dict[int, np.ndarray]:
        """The kept predictions of ``indices``, from whichever rank holds each."""
        return distributed.gather_dicts({index: self.kept[index] for index in indices if index in self.kept})


def draw_ranked(dataset: PairedDataset, scores: dict[int, float], chosen: dict[str, list[int]],
                predictions: dict[int, np.ndarray], folder: Path) -> None:
    """image | truth | prediction for the ``chosen`` best and worst images, named by their mIoU."""
    folder.mkdir(parents=True, exist_ok=True)
    for label, indices in chosen.items():
        for place, index in enumerate(indices, 1):
            image, truth = dataset.load(index)
            panel = panels(Image.fromarray(image), truth, predictions[index], dataset.class_names)
            name = f"{label}_{place:02d}_{dataset.pairs[index][0].stem}_miou{scores[index]:.3f}.jpg"
            with atomic_path(folder / name) as tmp:
                panel.save(tmp, format="JPEG", quality=90)


def write_per_image(dataset: PairedDataset, scores: dict[int, float], save_dir: Path) -> None:
    ranked = sorted(scores, key=scores.get)
    lines = ["image,miou"] + [f"{dataset.pairs[i][0].name},{scores[i]:.5f}" for i in ranked]
    write_text(save_dir / "per_image_iou.csv", "\n".join(lines) + "\n")
    plot_per_image_iou([scores[i] for i in ranked], save_dir / "per_image_iou.png")
