"""The evaluation loop over a loader of (images, masks) batches."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import (
    main_logits,
)
from utils import distributed
from utils.evaluation.metrics import ConfusionMatrix
from utils.precision import autocast

log = logging.getLogger("test")

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


@cudnn_benchmark_off()
@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, context: distributed.Context,
             criterion: nn.Module | None = None, precision: str = "auto") -> tuple[ConfusionMatrix, float]:
    """Confusion matrix (reduced over ranks) and mean loss of ``model`` on ``loader``."""
    model.eval()
    device = context.device
    matrix = ConfusionMatrix(num_classes, device=device)
    loss_sum = torch.zeros(2, device=device)
    for images, masks in tqdm(loader, desc="evaluate", disable=not context.is_main, dynamic_ncols=True):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, precision):
            outputs = model(images)
        logits = main_logits(outputs).float()
        if criterion is not None:
            loss_sum += torch.stack([criterion(logits, masks).float(), torch.ones((), device=device)])
        matrix.update(masks, logits.argmax(1))
    matrix.reduce_from_all_processes()
    distributed.all_reduce_sum(loss_sum)
    return matrix, (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


PredictionSink = Callable[[int, np.ndarray, np.ndarray], None]


@torch.inference_mode()
def confusion_over(model: torch.nn.Module, loader: DataLoader, num_classes: int, context: distributed.Context,
                   sinks: list[PredictionSink] = (), precision: str = "fp32") -> ConfusionMatrix:
    """Confusion matrix of ``model`` over ``loader`` (reduced over ranks); each image's
    prediction and truth, cropped to its own size, go to every ``sink(index, prediction, truth)``."""
    matrix = ConfusionMatrix(num_classes, device=context.device)
    dataset = loader.dataset
    for (images, masks), indices in zip(loader, loader.batch_sampler, strict=True):
        images = images.to(context.device).contiguous(memory_format=torch.channels_last)
        with autocast(context.device, precision):
            predictions = main_logits(model(images)).argmax(1)
        matrix.update(masks.to(context.device), predictions)
        if sinks:
            for index, prediction, truth in zip(indices, predictions.cpu().numpy(), masks.numpy(), strict=True):
                height, width = dataset.image_size(index)
                for sink in sinks:
                    sink(index, prediction[:height, :width], truth[:height, :width])
    matrix.reduce_from_all_processes()
    return matrix

