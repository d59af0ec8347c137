"""The report test.py writes: the summary and per-class table, metrics.json and the plots."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from utils.evaluation.metrics import format_optional
from utils.evaluation.plots import plot_class_iou, plot_confusion_matrix
from utils.fileio import write_text

log = logging.getLogger("test")

def format_table(report: dict) -> str:
    """Per-class IoU, Dice, pixel accuracy and support; classes neither present nor predicted omitted."""
    lines = [f"{'id':>3}  {'class':<18} {'IoU':>7} {'Dice':>7} {'acc':>7} {'support (px)':>14}"]
    for class_id in report["classes_counted"]:
        accuracy = report["class_accuracy"][class_id]
        lines.append(f"{class_id:>3}  {report['class_names'][class_id]:<18} {report['iou'][class_id]:7.4f} "
                     f"{report['dice'][class_id]:7.4f} {'    n/a' if accuracy is None else f'{accuracy:7.4f}'} "
                     f"{report['support'][class_id]:>14,}")
    return "\n".join(lines)


def write_report(report: dict, save_dir: Path) -> None:
    counted = report["classes_counted"]
    summary = (f"checkpoint: {report['checkpoint']}\nimages: {report['images']}\n"
               f"pixel accuracy: {format_optional(report['pixel_accuracy'])}\n"
               f"mIoU: {format_optional(report['miou'])} "
               f"(mean over the {len(counted)} classes present in ground truth or prediction)\n"
               f"mean Dice: {format_optional(report['mean_dice'])}\n\n")
    text = summary + format_table(report) + "\n"
    write_text(save_dir / "log_test.log", text)
    write_text(save_dir / "metrics.json", json.dumps(report, indent=1))
    names = report["class_names"]
    plot_confusion_matrix(np.array(report["confusion_matrix"]), names, save_dir / "vision_confusion_matrix.jpg")
    plot_class_iou(report["iou"], names, save_dir / "class_iou.png")
    log.info("\n%s", text)
    log.info("wrote %s, metrics.json, vision_confusion_matrix.jpg and class_iou.png", save_dir / "log_test.log")

