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

from model import load_model, min_input_size
from utils import distributed
from utils.data.datasets import DatasetError, PairedDataset, build_dataset
from utils.data.transforms import EvalTransform, padded_size
from utils.evaluation.loop import PredictionSink, evaluate
from utils.evaluation.per_image import PerImageScores, draw_ranked, ranked_choice, write_per_image
from utils.evaluation.report import write_report
from utils.fileio import atomic_path

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


def evaluation_loader(args: argparse.Namespace, dataset: PairedDataset, context: distributed.Context) -> DataLoader:
    """This rank's share of the images, batched by padded size."""
    indices = list(distributed.ShardSampler(len(dataset), context))
    return DataLoader(dataset, batch_sampler=SizeGroupedBatches(dataset, indices, args.batch_size),
                      num_workers=args.workers)


def load_evaluated(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict, PairedDataset]:
    """The checkpoint's model and meta, and the validation split prepared as the model needs it."""
    model, meta = load_model(args.checkpoint, device)
    transform = EvalTransform(tuple(meta["mean"]), tuple(meta["std"]), minimum=min_input_size(model))
    dataset = build_dataset(args, "val", transform)
    if dataset.num_classes != meta["num_classes"]:
        raise DatasetError(f"the dataset has {dataset.num_classes} classes but {args.checkpoint} predicts "
                           f"{meta['num_classes']}: pass the class names it was trained with")
    return model, meta, dataset


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Evaluate ``args.checkpoint`` on the validation split; rank 0 writes the report."""
    context = distributed.setup(args.device)
    try:
        model, meta, dataset = load_evaluated(args, context.device)
        per_image = PerImageScores(meta["num_classes"], args.rank_images)
        sinks = [per_image] + ([class_map_writer(dataset, Path(args.save_predictions))]
                               if args.save_predictions else [])
        log.info("evaluating %s (%s) on %d images, %d process(es), device %s, precision %s", args.checkpoint,
                 meta["arch"], len(dataset), context.world_size, context.device, args.precision)
        matrix, _ = evaluate(model, evaluation_loader(args, dataset, context), meta["num_classes"], context,
                             precision=args.precision, sinks=sinks)
        scores = per_image.gathered()
        chosen = ranked_choice(scores, args.rank_images)
        predictions = per_image.gathered_predictions({index for indices in chosen.values() for index in indices})
        report = dict(matrix.compute(), checkpoint=str(args.checkpoint), images=len(dataset), precision=args.precision,
                      class_names=meta["class_names"], confusion_matrix=matrix.matrix.cpu().tolist())
        if context.is_main:
            save_dir = Path(args.save_dir)
            write_report(report, save_dir)
            write_per_image(dataset, scores, save_dir)
            draw_ranked(dataset, scores, chosen, predictions, save_dir / "best_worst")
        return report
    finally:
        distributed.cleanup()
