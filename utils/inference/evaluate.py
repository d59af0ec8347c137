"""test.py through the Predictor (``--mode whole|slide``, ``--tta``, ``--corruptions``): the
validation images scored as predict.py and the service see them, one image at a time.

Without corruptions every prediction is scored at the image's own resolution, beside the plain
whole-mode result, so that a strategy's gain is printed with its cost.  Under corruptions each
image is first brought to the resolution the network works at (whole: the long side at the training
size; slide: ``--scale`` x its own), so that a blur or a noise acts on the pixels the network sees,
not on pixels a resize averages away; the clean row is scored the same way, so the relative
robustness compares like with like.  A corruption's random draws depend on the seed, the
corruption, the severity and the image, so a rerun gives the same numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils.data.corruptions import corrupt, parse_corruptions, parse_severities
from utils.data.datasets import DatasetError, PairedDataset, build_dataset
from utils.evaluation.metrics import ConfusionMatrix, format_optional
from utils.evaluation.report import write_report
from utils.evaluation.robustness import Scores, summarize_robustness, write_robustness
from utils.inference.predictor import Predictor, fit_long_side
from utils.inference.tiling import WHOLE, Strategy, StrategyError, scaled_size, strategy_from_args

log = logging.getLogger("test")

Sample = tuple[np.ndarray, np.ndarray]  # (H x W x 3 uint8 image, H x W mask)


@dataclasses.dataclass
class Scored:
    matrix: ConfusionMatrix
    seconds_per_image: float

    def scores(self, target: int | None) -> Scores:
        metrics = self.matrix.compute()
        return {"miou": metrics["miou"], "target_iou": None if target is None else metrics["iou"][target]}


def score(predictor: Predictor, samples: Iterable[Sample], strategy: Strategy, desc: str) -> Scored:
    """The confusion matrix of ``predictor``'s class maps against the masks, and the seconds per image."""
    matrix, seconds, count = ConfusionMatrix(predictor.num_classes), 0.0, 0
    for image, mask in tqdm(samples, desc=desc, dynamic_ncols=True, leave=False):
        started = time.perf_counter()
        class_map = predictor.predict(Image.fromarray(image), strategy).class_map
        seconds, count = seconds + time.perf_counter() - started, count + 1
        matrix.update(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(class_map.astype(np.int64)))
    return Scored(matrix, seconds / max(1, count))


def working_resolution(sample: Sample, strategy: Strategy, training_size: tuple[int, int]) -> Sample:
    """The image (bilinear) and its mask (nearest) at the resolution the network works at."""
    image, mask = sample
    height, width = mask.shape
    if strategy.mode == "whole":
        size = fit_long_side(width, height, max(training_size))
    else:
        size = scaled_size((width, height), strategy.scale or 1.0)
    if size == (width, height):
        return image, mask
    return (np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)),
            np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST)))


def corruption_seed(seed: int, name: str, severity: int, index: int) -> int:
    return zlib.crc32(f"{seed}/{name}/{severity}/{index}".encode())


def target_class(names: Sequence[str], requested: str | None) -> int | None:
    """The class the robustness report follows besides mIoU: ``requested``, else the foreground of a
    two-class model (flood), else none."""
    if requested is not None:
        if requested not in names:
            raise DatasetError(f"--target-class {requested!r} is not one of the checkpoint's classes")
        return list(names).index(requested)
    return 1 if len(names) == 2 else None


def load_samples(dataset: PairedDataset) -> list[Sample]:
    return [dataset.load(index) for index in tqdm(range(len(dataset)), desc="load", dynamic_ncols=True, leave=False)]


def evaluate_strategy(predictor: Predictor, dataset: PairedDataset, strategy: Strategy,
                      args: argparse.Namespace) -> dict:
    """test.py's report for ``strategy``, and its mIoU and cost beside plain whole-mode prediction."""
    samples = load_samples(dataset)
    scored = score(predictor, samples, strategy, f"{strategy.mode}, tta {strategy.tta}")
    report = dict(scored.matrix.compute(), checkpoint=str(args.checkpoint), images=len(dataset), mode=strategy.mode,
                  tta=strategy.tta, backend=predictor.backend, precision=predictor.precision,
                  seconds_per_image=scored.seconds_per_image, class_names=predictor.class_names,
                  confusion_matrix=scored.matrix.matrix.tolist())
    if not strategy.plain:
        plain = score(predictor, samples, WHOLE, "whole, tta none")
        plain_metrics = plain.matrix.compute()
        report["plain_whole"] = {"miou": plain_metrics["miou"], "iou": plain_metrics["iou"],
                                 "seconds_per_image": plain.seconds_per_image}
        log.info("mode %s, tta %s: mIoU %s against %s in plain whole mode; %.2f s per image against %.2f (%.1fx)",
                 strategy.mode, strategy.tta, format_optional(report["miou"]),
                 format_optional(report["plain_whole"]["miou"]), scored.seconds_per_image, plain.seconds_per_image,
                 scored.seconds_per_image / max(plain.seconds_per_image, 1e-9))
    write_report(report, Path(args.save_dir))
    return report


def evaluate_robustness(predictor: Predictor, dataset: PairedDataset, strategy: Strategy, args: argparse.Namespace,
                    corruptions: list[str], severities: list[int]) -> dict:
    """The robustness report: every corruption at every severity over the same images."""
    target = target_class(predictor.class_names, args.target_class)
    at_work = strategy if strategy.mode == "whole" else dataclasses.replace(strategy, scale=None)
    samples = [working_resolution(sample, strategy, predictor.input_size) for sample in load_samples(dataset)]
    clean = score(predictor, samples, at_work, "clean").scores(target)
    by_corruption: dict[str, dict[int, Scores]] = {}
    for name in tqdm(corruptions, desc="corruptions", dynamic_ncols=True):
        by_corruption[name] = {}
        for severity in severities:
            corrupted = ((corrupt(image, name, severity, corruption_seed(args.seed or 0, name, severity, index)), mask)
                         for index, (image, mask) in enumerate(samples))
            by_corruption[name][severity] = score(predictor, corrupted, at_work, f"{name} {severity}").scores(target)
    summary = summarize_robustness(clean, by_corruption)
    summary.update(checkpoint=str(args.checkpoint), images=len(samples), mode=strategy.mode, tta=strategy.tta,
                   seed=args.seed or 0)
    write_robustness(summary, None if target is None else predictor.class_names[target], Path(args.save_dir))
    return summary


def through_predictor(args: argparse.Namespace) -> bool:
    """Whether test.py's options ask for the Predictor (--mode whole or slide), refusing the options
    that would otherwise be ignored: the predictor's in full mode, the corruptions' without them,
    and the predictor path under torchrun (it runs in one process)."""
    given = [f"--{name.replace('_', '-')}" for name in ("tile", "stride", "scale", "corruptions", "backend", "seed",
                                                      "target_class") if getattr(args, name) is not None]
    given += ["--tta"] if args.tta != "none" else []
    if args.mode == "full":
        if given:
            raise StrategyError(f"{', '.join(given)}: the predictor's options; pass --mode whole or --mode slide")
        return False
    unused = [name for name in ("--seed", "--target-class") if name in given and args.corruptions is None]
    if unused:
        raise StrategyError(f"{', '.join(unused)}: only with --corruptions")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StrategyError("--mode whole|slide runs in one process: start test.py without torchrun")
    return True


def evaluate_through_predictor(args: argparse.Namespace) -> dict:
    """test.py with --mode whole|slide, --tta or --corruptions: the arguments are checked before
    the checkpoint loads."""
    strategy = strategy_from_args(args)
    corruptions = parse_corruptions(args.corruptions) if args.corruptions else []
    severities = parse_severities(args.severities)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision,
                                          backend=args.backend or "torch")
    dataset = build_dataset(args, "val")
    if dataset.num_classes != predictor.num_classes:
        raise DatasetError(f"the dataset has {dataset.num_classes} classes but {args.checkpoint} predicts "
                           f"{predictor.num_classes}: pass the class names it was trained with")
    log.info("evaluating %s through the predictor (%s, %s) on %d images: mode %s, tta %s%s", args.checkpoint,
             predictor.backend, predictor.precision, len(dataset), strategy.mode, strategy.tta,
             f", corruptions {', '.join(corruptions)} at severities {severities}" if corruptions else "")
    if corruptions:
        return evaluate_robustness(predictor, dataset, strategy, args, corruptions, severities)
    return evaluate_strategy(predictor, dataset, strategy, args)
