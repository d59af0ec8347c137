"""The robustness report (test.py --corruptions): mIoU and a target class's IoU per corruption and
severity, their mean over severities, and the relative robustness of Kamann & Rother (CVPR 2020):
corrupted mIoU / clean mIoU, written as robustness.md, robustness.json and one plot per metric."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from utils.evaluation.metrics import format_optional, mean_of_defined
from utils.evaluation.plots import plot_robustness
from utils.fileio import write_text

log = logging.getLogger("test")

Scores = dict[str, float | None]  # {"miou": ..., "target_iou": ...}


def summarize_robustness(clean: Scores, by_corruption: dict[str, dict[int, Scores]]) -> dict:
    """Each corruption's scores per severity, their means, and the relative robustness (mean
    corrupted mIoU / clean mIoU); the same over all corruptions."""
    corruptions = {}
    for name, by_severity in by_corruption.items():
        mean = {metric: mean_of_defined([scores[metric] for scores in by_severity.values()]) for metric in clean}
        corruptions[name] = {"severities": {str(s): scores for s, scores in sorted(by_severity.items())},
                             "mean": mean, "relative_miou": ratio(mean["miou"], clean["miou"])}
    overall = {metric: mean_of_defined([c["mean"][metric] for c in corruptions.values()]) for metric in clean}
    return {"clean": clean, "corruptions": corruptions, "mean": overall,
            "relative_miou": ratio(overall["miou"], clean["miou"])}


def ratio(corrupted: float | None, clean: float | None) -> float | None:
    return None if corrupted is None or not clean else corrupted / clean


def robustness_table(summary: dict, target: str | None) -> str:
    """Markdown: a row per corruption, mIoU (and the target's IoU) per severity, mean and relative."""
    severities = sorted({int(s) for c in summary["corruptions"].values() for s in c["severities"]})
    metrics = ["miou"] + (["target_iou"] if target else [])
    label = {"miou": "mIoU", "target_iou": f"IoU {target}"}
    header = ["corruption", "metric", *(str(s) for s in severities), "mean", "relative mIoU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    clean = summary["clean"]
    for metric in metrics:
        lines.append(f"| clean | {label[metric]} | " + " | ".join([format_optional(clean[metric])] * len(severities))
                     + f" | {format_optional(clean[metric])} | {'1.0000' if metric == 'miou' else ''} |")
    for name, corruption in [*summary["corruptions"].items(), ("mean of all", None)]:
        for metric in metrics:
            cells = ([format_optional(corruption["severities"][str(s)][metric]) for s in severities] if corruption
                     else [""] * len(severities))
            mean = (corruption or summary)["mean"][metric]
            relative = format_optional((corruption or summary)["relative_miou"]) if metric == "miou" else ""
            lines.append(f"| {name} | {label[metric]} | " + " | ".join(cells) + f" | {format_optional(mean)} | "
                         f"{relative} |")
    return "\n".join(lines)


def write_robustness(summary: dict, target: str | None, save_dir: Path) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    table = robustness_table(summary, target)
    write_text(save_dir / "robustness.md", table + "\n")
    write_text(save_dir / "robustness.json", json.dumps(dict(summary, target_class=target), indent=1))
    for metric, name in [("miou", "mIoU"), *([("target_iou", f"IoU {target}")] if target else [])]:
        by_corruption = {corruption: {int(s): scores[metric] for s, scores in c["severities"].items()}
                         for corruption, c in summary["corruptions"].items()}
        plot_robustness(summary["clean"][metric], by_corruption, name, save_dir / f"robustness_{metric}.png")
    log.info("\n%s", table)
    log.info("wrote %s, robustness.json and robustness_*.png", save_dir / "robustness.md")
