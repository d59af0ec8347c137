"""The one evaluation loop over a loader of (images, masks) batches: train-time validation and test.py."""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import main_logits
from utils import distributed
from utils.data.datasets import PairedDataset
from utils.evaluation.metrics import ConfusionMatrix
from utils.precision import autocast


@contextlib.contextmanager
def cudnn_benchmark_off() -> Iterator[None]:
    """cuDNN's autotuning pays off for the fixed-size crops of training; whole validation
    images each have their own size, and it would tune again for every new one."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


PredictionSink = Callable[[int, np.ndarray, np.ndarray], None]  # (dataset index, prediction, truth)


@cudnn_benchmark_off()
@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, context: distributed.Context,
             criterion: nn.Module | None = None, precision: str = "auto",
             sinks: Sequence[PredictionSink] = ()) -> tuple[ConfusionMatrix, float]:
    """Confusion matrix (reduced over ranks) and mean loss of ``model`` on ``loader``: train-time
    validation and test.py alike.  With ``sinks``, each image's prediction and truth, cropped to its
    own size, go to every ``sink(index, prediction, truth)`` (the loader's batch sampler names the
    indices)."""
    model.eval()
    device = context.device
    matrix = ConfusionMatrix(num_classes, device=device)
    loss_sum = torch.zeros(2, device=device)
    batch_indices = loader.batch_sampler if sinks else itertools.repeat(None)
    batches = tqdm(loader, desc="evaluate", disable=not context.is_main, dynamic_ncols=True)
    for (images, masks), indices in zip(batches, batch_indices, strict=bool(sinks)):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            outputs = model(images)
        logits = main_logits(outputs).float()
        on_device = masks.to(device, non_blocking=True)
        if criterion is not None:
            loss_sum += torch.stack([criterion(logits, on_device).float(), torch.ones((), device=device)])
        predictions = logits.argmax(1)
        matrix.update(on_device, predictions)
        if sinks:
            send_to_sinks(loader.dataset, indices, predictions, masks, sinks)
    matrix.reduce_from_all_processes()
    distributed.all_reduce_sum(loss_sum)
    return matrix, (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


def send_to_sinks(dataset: PairedDataset, indices: list[int], predictions: torch.Tensor, masks: torch.Tensor,
                  sinks: Sequence[PredictionSink]) -> None:
    """Each image of the batch, cropped back to its own size, to every sink."""
    for index, prediction, truth in zip(indices, predictions.cpu().numpy(), masks.numpy(), strict=True):
        height, width = dataset.image_size(index)
        for sink in sinks:
            sink(index, prediction[:height, :width], truth[:height, :width])
