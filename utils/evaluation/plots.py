"""Pictures people would rather look at than read: training curves, confusion matrix, IoU bars."""
from __future__ import annotations

import csv
import os

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from utils.fileio import atomic_path  # noqa: E402


def _save(figure, path: str | os.PathLike, **kwargs) -> None:
    suffix = os.path.splitext(str(path))[1]
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=suffix.lstrip(".").replace("jpg", "jpeg"), **kwargs)
    plt.close(figure)


def plot_training_curves(log_csv: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Loss and mIoU per epoch from the training CSV log."""
    with open(log_csv) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    figure, (loss_axis, miou_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o", label="train")
    validated = [(int(r["epoch"]), r) for r in rows if r["miou"]]
    if validated:
        loss_axis.plot([e for e, _ in validated], [float(r["val_loss"]) for _, r in validated],
                       marker="o", label="val")
        miou_axis.plot([e for e, _ in validated], [float(r["miou"]) for _, r in validated], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axis.legend()
    miou_axis.set(xlabel="epoch", ylabel="mIoU", title="validation mIoU")
    for axis in (loss_axis, miou_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, out_png, dpi=100)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], out_path: str | os.PathLike) -> None:
    """Row-normalised matrix on a log colour scale, class names on both axes, no cell text."""
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    size = min(24, max(6, 0.22 * len(class_names) + 3))
    figure, axis = plt.subplots(figsize=(size, size))
    floor = max(normalised[normalised > 0].min() if (normalised > 0).any() else 1e-4, 1e-4)
    colours = ScalarMappable(norm=LogNorm(vmin=floor, vmax=1), cmap="viridis")
    # Coloured here, cell by cell: given the values, matplotlib would take the log of every pixel of
    # the image resampled to the figure's size (6 M for 91 classes), half of the plot's time.
    axis.imshow(colours.to_rgba(np.where(normalised > 0, normalised, np.nan), bytes=True), interpolation="nearest")
    ticks = np.arange(len(class_names))
    font = max(4, min(9, 500 // max(len(class_names), 1)))
    axis.set_xticks(ticks, class_names, rotation=90, fontsize=font)
    axis.set_yticks(ticks, class_names, fontsize=font)
    axis.set(xlabel="predicted", ylabel="ground truth", title="confusion matrix (row-normalised)")
    figure.colorbar(colours, ax=axis, fraction=0.04, pad=0.02, label="fraction of the true class")
    figure.tight_layout()
    _save(figure, out_path, dpi=110)


def plot_per_image_iou(sorted_scores: list[float], out_path: str | os.PathLike) -> None:
    """Per-image mIoU from worst to best: how evenly the model does across images."""
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot(range(1, len(sorted_scores) + 1), sorted_scores, marker=".", linewidth=1)
    if sorted_scores:
        axis.axhline(float(np.mean(sorted_scores)), color="tab:red", linestyle="--",
                     label=f"mean {np.mean(sorted_scores):.3f}")
        axis.legend()
    axis.set(xlabel="images, worst to best", ylabel="image mIoU", ylim=(0, 1), title="per-image mIoU")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, out_path, dpi=100)


def plot_class_iou(ious: list[float | None], class_names: list[str], out_path: str | os.PathLike) -> None:
    """Horizontal bars of per-class IoU for the classes where it is defined."""
    defined = [(name, iou) for name, iou in zip(class_names, ious, strict=True) if iou is not None]
    defined.sort(key=lambda item: item[1])
    figure, axis = plt.subplots(figsize=(7, max(3, 0.18 * len(defined) + 1)))
    axis.barh([n for n, _ in defined], [v for _, v in defined], color="tab:blue")
    axis.set(xlim=(0, 1), xlabel="IoU", title="per-class IoU")
    axis.tick_params(axis="y", labelsize=7)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    _save(figure, out_path, dpi=100)


def plot_robustness(clean: float | None, by_corruption: dict[str, dict[int, float | None]], metric: str,
                    out_path: str | os.PathLike) -> None:
    """``metric`` against severity, a line per corruption, the clean score as a dashed line."""
    figure, axes = plt.subplots(figsize=(10, 5.5))
    for index, (name, by_severity) in enumerate(by_corruption.items()):
        severities = sorted(by_severity)
        # 20 colours, then dashed: about 19 corruptions stay apart
        axes.plot(severities, [np.nan if by_severity[s] is None else by_severity[s] for s in severities],
                  marker="o", label=name, color=plt.cm.tab20(index % 20), linestyle="-" if index < 20 else "--")
    if clean is not None:
        axes.axhline(clean, color="black", linestyle="--", label="clean")
    axes.set_xlabel("severity")
    axes.set_ylabel(metric)
    axes.set_xticks(range(1, 6))
    axes.set_title(f"{metric} under corruption")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(alpha=0.3)
    _save(figure, out_path, dpi=110, bbox_inches="tight")
