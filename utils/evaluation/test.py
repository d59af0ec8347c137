"""test.py's engine: a checkpoint evaluated on a dataset at full resolution, with the per-image ranking."""
from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from model import load_model, main_logits, min_input_size
from utils import distributed
from utils.classes import IGNORE_INDEX
from utils.data.datasets import DatasetError, PairedDataset, build_dataset
from utils.data.transforms import EvalTransform, padded_size
from utils.drawing import panels
from utils.evaluation.loop import PredictionSink, confusion_over
from utils.evaluation.metrics import ConfusionMatrix
from utils.evaluation.plots import plot_per_image_iou
from utils.evaluation.report import write_report
from utils.fileio import atomic_path, write_text
from utils.precision import autocast

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


def class_map_writer(dataset: PairedDataset, folder: Path) -> PredictionSink:
    """A sink that saves each prediction as ``<folder>/<image stem>.png`` of class ids."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(index: int, prediction: np.ndarray, truth: np.ndarray) -> None:
        with atomic_path(folder / f"{dataset.pairs[index][0].stem}.png") as tmp:
            Image.fromarray(prediction.astype(np.uint8)).save(tmp, format="PNG")
    return write


def image_miou(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float | None:
    """Mean IoU over the classes present in this image's truth or prediction (ignore excluded)."""
    valid = truth != IGNORE_INDEX
    matrix = ConfusionMatrix(num_classes)
    matrix.update(torch.from_numpy(truth[valid].astype(np.int64)), torch.from_numpy(prediction[valid]))
    return matrix.compute()["miou"]


class PerImageScores:
    """A sink collecting each image's mIoU, gathered over ranks for the ranking."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.scores: dict[int, float] = {}

    def __call__(self, index: int, prediction: np.ndarray, truth: np.ndarray) -> None:
        score = image_miou(prediction, truth, self.num_classes)
        if score is not None:
            self.scores[index] = score

    def gathered(self) -> dict[int, float]:
        return distributed.gather_dicts(self.scores)


@torch.inference_mode()
def full_resolution_prediction(model: torch.nn.Module, dataset: PairedDataset, index: int,
                               device: torch.device, precision: str = "fp32") -> np.ndarray:
    """The model's class map for one evaluation image, cropped to the image."""
    image, _ = dataset[index]
    with autocast(device, precision):
        logits = main_logits(model(image[None].to(device).contiguous(memory_format=torch.channels_last)))
    height, width = dataset.image_size(index)
    return logits.argmax(1)[0, :height, :width].cpu().numpy()


def draw_ranked(model: torch.nn.Module, dataset: PairedDataset, scores: dict[int, float], count: int,
                folder: Path, device: torch.device, precision: str = "fp32") -> None:
    """image | truth | prediction for the ``count`` best and worst images by their mIoU."""
    ranked = sorted(scores, key=scores.get)
    chosen = {"worst": ranked[:count], "best": ranked[::-1][:count]}
    folder.mkdir(parents=True, exist_ok=True)
    for label, indices in chosen.items():
        for place, index in enumerate(indices, 1):
            image, truth = dataset.load(index)
            prediction = full_resolution_prediction(model, dataset, index, device, precision)
            panel = panels(Image.fromarray(image), truth, prediction, dataset.class_names)
            name = f"{label}_{place:02d}_{dataset.pairs[index][0].stem}_miou{scores[index]:.3f}.jpg"
            with atomic_path(folder / name) as tmp:
                panel.save(tmp, format="JPEG", quality=90)


def write_per_image(dataset: PairedDataset, scores: dict[int, float], save_dir: Path) -> None:
    ranked = sorted(scores, key=scores.get)
    lines = ["image,miou"] + [f"{dataset.pairs[i][0].name},{scores[i]:.5f}" for i in ranked]
    write_text(save_dir / "per_image_iou.csv", "\n".join(lines) + "\n")
    plot_per_image_iou([scores[i] for i in ranked], save_dir / "per_image_iou.png")


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Evaluate ``args.checkpoint`` on the validation split; rank 0 writes the report."""
    context = distributed.setup(args.device)
    try:
        model, meta = load_model(args.checkpoint, context.device)
        transform = EvalTransform(tuple(meta["mean"]), tuple(meta["std"]), minimum=min_input_size(model))
        dataset = build_dataset(args, "val", transform)
        if dataset.num_classes != meta["num_classes"]:
            raise DatasetError(f"the dataset has {dataset.num_classes} classes but {args.checkpoint} predicts "
                               f"{meta['num_classes']}: pass the class names it was trained with")
        indices = list(distributed.ShardSampler(len(dataset), context))
        loader = DataLoader(dataset, batch_sampler=SizeGroupedBatches(dataset, indices, args.batch_size),
                            num_workers=args.workers)
        per_image = PerImageScores(meta["num_classes"])
        sinks = [per_image] + ([class_map_writer(dataset, Path(args.save_predictions))]
                               if args.save_predictions else [])
        log.info("evaluating %s (%s) on %d images, %d process(es), device %s, precision %s", args.checkpoint,
                 meta["arch"], len(dataset), context.world_size, context.device, args.precision)
        matrix = confusion_over(model, loader, meta["num_classes"], context, sinks, args.precision)
        scores = per_image.gathered()
        report = dict(matrix.compute(), checkpoint=str(args.checkpoint), images=len(dataset), precision=args.precision,
                      class_names=meta["class_names"], confusion_matrix=matrix.matrix.cpu().tolist())
        if context.is_main:
            save_dir = Path(args.save_dir)
            write_report(report, save_dir)
            write_per_image(dataset, scores, save_dir)
            draw_ranked(model, dataset, scores, args.rank_images, save_dir / "best_worst", context.device,
                        args.precision)
        return report
    finally:
        distributed.cleanup()

