"""Evaluating a checkpoint on a dataset at full resolution, and the report test.py writes."""
from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from model import build_from_meta, main_logits
from utils import distributed
from utils.checkpoint import load_checkpoint
from utils.datasets import DatasetError, PairedDataset, build_dataset
from utils.fileio import atomic_path, write_text
from utils.metrics import ConfusionMatrix
from utils.plots import plot_class_iou, plot_confusion_matrix
from utils.precision import autocast
from utils.transforms import EvalTransform, padded_size

log = logging.getLogger("test")


class SizeGroupedBatches(Sampler[list[int]]):
    """Batches of images that pad to the same size, so whole images can be batched."""

    def __init__(self, dataset: PairedDataset, indices: list[int], batch_size: int) -> None:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in indices:
            groups[padded_size(*dataset.image_size(index))].append(index)
        self.batches = [group[i:i + batch_size] for _, group in sorted(groups.items())
                        for i in range(0, len(group), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A model rebuilt from a checkpoint's own metadata, in eval mode on ``device``."""
    checkpoint = load_checkpoint(path, map_location=device)
    model = build_from_meta(checkpoint["meta"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device, memory_format=torch.channels_last).eval(), checkpoint["meta"]


PredictionSink = Callable[[int, np.ndarray], None]


@torch.inference_mode()
def confusion_over(model: torch.nn.Module, loader: DataLoader, num_classes: int, context: distributed.Context,
                   sink: PredictionSink | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over ``loader`` (reduced over ranks); each image's
    prediction, cropped to its own size, goes to ``sink(index, class_map)`` when given."""
    matrix = ConfusionMatrix(num_classes, device=context.device)
    dataset = loader.dataset
    for (images, masks), indices in zip(loader, loader.batch_sampler, strict=True):
        images = images.to(context.device).contiguous(memory_format=torch.channels_last)
        with autocast(context.device):
            predictions = main_logits(model(images)).argmax(1)
        matrix.update(masks.to(context.device), predictions)
        if sink is not None:
            for index, prediction in zip(indices, predictions.cpu().numpy(), strict=True):
                height, width = dataset.image_size(index)
                sink(index, prediction[:height, :width])
    matrix.reduce_from_all_processes()
    return matrix


def class_map_writer(dataset: PairedDataset, folder: Path) -> PredictionSink:
    """A sink that saves each prediction as ``<folder>/<image stem>.png`` of class ids."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(index: int, class_map: np.ndarray) -> None:
        with atomic_path(folder / f"{dataset.pairs[index][0].stem}.png") as tmp:
            Image.fromarray(class_map.astype(np.uint8)).save(tmp, format="PNG")
    return write


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Evaluate ``args.checkpoint`` on the validation split; rank 0 writes the report."""
    context = distributed.setup(args.device)
    try:
        model, meta = load_model(args.checkpoint, context.device)
        dataset = build_dataset(args, "val", EvalTransform(tuple(meta["mean"]), tuple(meta["std"])))
        if dataset.num_classes != meta["num_classes"]:
            raise DatasetError(f"the dataset has {dataset.num_classes} classes but {args.checkpoint} predicts "
                               f"{meta['num_classes']}: pass the class names it was trained with")
        indices = list(distributed.ShardSampler(len(dataset), context))
        loader = DataLoader(dataset, batch_sampler=SizeGroupedBatches(dataset, indices, args.batch_size),
                            num_workers=args.workers)
        sink = class_map_writer(dataset, Path(args.save_predictions)) if args.save_predictions else None
        log.info("evaluating %s (%s) on %d images, %d process(es), device %s", args.checkpoint, meta["arch"],
                 len(dataset), context.world_size, context.device)
        matrix = confusion_over(model, loader, meta["num_classes"], context, sink)
        report = dict(matrix.compute(), checkpoint=str(args.checkpoint), images=len(dataset),
                      class_names=meta["class_names"], confusion_matrix=matrix.matrix.cpu().tolist())
        if context.is_main:
            write_report(report, Path(args.save_dir))
        return report
    finally:
        distributed.cleanup()


def format_table(report: dict) -> str:
    """Per-class IoU with names and pixel support, classes without support or prediction omitted."""
    lines = [f"{'id':>3}  {'class':<18} {'IoU':>7} {'support (px)':>14}"]
    for class_id, (name, iou) in enumerate(zip(report["class_names"], report["iou"], strict=True)):
        if iou is not None:
            lines.append(f"{class_id:>3}  {name:<18} {iou:7.4f} {report['support'][class_id]:>14,}")
    return "\n".join(lines)


def write_report(report: dict, save_dir: Path) -> None:
    counted = report["classes_counted"]
    summary = (f"checkpoint: {report['checkpoint']}\nimages: {report['images']}\n"
               f"pixel accuracy: {report['pixel_accuracy']:.4f}\n"
               f"mIoU: {report['miou'] if report['miou'] is None else round(report['miou'], 4)} "
               f"(mean over the {len(counted)} classes present in ground truth or prediction)\n\n")
    text = summary + format_table(report) + "\n"
    write_text(save_dir / "log_test.log", text)
    write_text(save_dir / "metrics.json", json.dumps(report, indent=1))
    names = report["class_names"]
    plot_confusion_matrix(np.array(report["confusion_matrix"]), names, save_dir / "vision_confusion_matrix.jpg")
    plot_class_iou(report["iou"], names, save_dir / "class_iou.png")
    log.info("\n%s", text)
    log.info("wrote %s, metrics.json, vision_confusion_matrix.jpg and class_iou.png", save_dir / "log_test.log")
