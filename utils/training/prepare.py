"""A training run prepared from train.py's options: checks, data loaders, the model with its pretrained
parts, loss, optimiser and schedule."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from model import build_model, load_pretrained, min_input_size, model_meta, never_predict
from model.encoder_weights import load_encoder_weights
from utils import distributed
from utils.classes import VOC_CLASSES, never_labelled_ids
from utils.data.augment import train_transform
from utils.data.datasets import PairedDataset, build_dataset
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from utils.errors import UserError
from utils.training.distillation import GroupedDistillation
from utils.training.losses import build_loss, class_weights_from_counts
from utils.training.options import TrainingError, arch_args, check_architecture_options

log = logging.getLogger("train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything one training run holds; built by ``prepare``."""
    args: argparse.Namespace
    context: distributed.Context
    model: nn.Module
    bare_model: nn.Module  # without the DDP wrapper: what is saved and evaluated
    train_loader: DataLoader
    val_loader: DataLoader
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    meta: dict
    distillation: GroupedDistillation | None = None
    start_epoch: int = 1
    best_metric: float | None = None
    last_metrics: dict | None = None


def make_train_loader(args: argparse.Namespace, context: distributed.Context) -> tuple[DataLoader, PairedDataset]:
    train_set = build_dataset(args, "train", train_transform(args.augment, args.crop_size))
    train_sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if context.distributed else None
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, num_workers=args.workers,
                              pin_memory=context.device.type == "cuda", drop_last=True,
                              persistent_workers=args.workers > 0)
    if len(train_loader) == 0:
        raise TrainingError(f"batch size {args.batch_size} is larger than the {len(train_set)} training "
                              "images on this process: lower --batch-size")
    return train_loader, train_set


def make_val_loader(args: argparse.Namespace, context: distributed.Context, model: nn.Module) -> DataLoader:
    """Whole validation images, padded to what ``model`` accepts; they differ in size, so one per batch."""
    val_set = build_dataset(args, "val", EvalTransform(minimum=min_input_size(model)))
    return DataLoader(val_set, batch_size=1, sampler=distributed.ShardSampler(len(val_set), context),
                      num_workers=args.workers, pin_memory=context.device.type == "cuda")


def make_criterion(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    weights = None
    if args.class_weights:
        counts = read_class_counts(args.class_weights, num_classes)
        weights = class_weights_from_counts(counts, args.class_weight_mode).to(device)
    try:
        if args.loss == "focal":
            return build_loss("focal", alpha=weights if weights is not None else args.focal_alpha,
                              gamma=args.focal_gamma).to(device)
        return build_loss(args.loss, weight=weights).to(device)
    except ValueError as error:
        raise TrainingError(str(error)) from error


def read_class_counts(path: str, num_classes: int) -> list[int]:
    """Per-class pixel counts from the converter's conversion.json."""
    counts = json.loads(Path(path).read_text()).get("class_pixel_counts")
    if not isinstance(counts, list) or len(counts) != num_classes:
        raise TrainingError(f"{path} has no class_pixel_counts for {num_classes} classes")
    return counts


def build_pretrained_model(args: argparse.Namespace, arguments: dict,
                           class_names: list[str]) -> tuple[nn.Module, dict | None]:
    """The model with any pretrained weights asked for; and where its encoder's weights came from."""
    with errors_named("--model"):  # the networks' checks of their arguments, which come from the options
        model = build_model(args.model, **arguments)
    encoder_source = None
    if args.weights:
        with errors_named("--weights"):
            log.info("pretrained weights: %s", load_pretrained(model, args.weights))
    if args.encoder_weights:
        with errors_named("--encoder-weights"):
            encoder_source = load_encoder_weights(model, args.encoder_weights, arguments.get("encoder", "")).as_meta()
        if not args.train_encoder_bn:
            model.freeze_encoder_batchnorm()
    if args.voc_head:
        from model.smp_models import load_voc_head  # only here: SMP takes ~1.5 s to import

        with errors_named("--voc-head"):
            log.info("%s", load_voc_head(model, args.voc_head, class_names))
    return model, encoder_source


@contextlib.contextmanager
def errors_named(option: str) -> Iterator[None]:
    """A user's mistake or a network's refusal while ``option`` is applied, as a TrainingError that
    names the option."""
    try:
        yield
    except (UserError, ValueError) as error:
        raise TrainingError(f"{option}: {error}") from error


def parameter_groups(model: nn.Module, lr: float, encoder_lr_factor: float) -> list[dict]:
    """The decoder and head at ``lr``, the parts pretrained weights fill (the encoder, a VOC head)
    at ``lr * encoder_lr_factor``: pretrained features need small steps, the randomly initialised
    decoder large ones.  The decoder's group comes first: the log's ``lr`` column reports it."""
    if not hasattr(model, "pretrained_parts"):
        return [{"params": list(model.parameters()), "lr": lr}]
    pretrained = [p for part in model.pretrained_parts() for p in part.parameters()]
    pretrained_ids = {id(p) for p in pretrained}
    rest = [p for p in model.parameters() if id(p) not in pretrained_ids]
    return [{"params": rest, "lr": lr}, {"params": pretrained, "lr": lr * encoder_lr_factor}]


def make_distillation(args: argparse.Namespace, class_names: list[str],
                      device: torch.device) -> GroupedDistillation | None:
    if not args.distill_from:
        return None
    from model.deeplab_voc import load_voc_teacher  # only here: torchvision takes ~2 s to import

    with errors_named("--distill-from"):
        return GroupedDistillation(load_voc_teacher(args.distill_from), VOC_CLASSES, class_names,
                                   args.distill_weight).to(device, memory_format=torch.channels_last)


def check_options(args: argparse.Namespace) -> None:
    check_architecture_options(args)
    if args.voc_head and not args.encoder_weights:
        # The VOC head reads the encoder's block-17 features: behind a random encoder it reads noise.
        raise TrainingError("--voc-head needs the encoder it was trained on: add --encoder-weights "
                            "with the same DeepLab file")


def set_encoder_trainable(model: nn.Module, trainable: bool) -> bool:
    """Whether this changed which parameters learn."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or all(p.requires_grad == trainable for p in encoder.parameters()):
        return False
    encoder.requires_grad_(trainable)
    return True


def distribute(model: nn.Module, context: distributed.Context) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else itself.  DDP waits for a gradient
    of every parameter that required one when it was built, so it is rebuilt whenever that set
    changes (``--freeze-encoder-epochs``) rather than searching for unused ones at every step."""
    if not context.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[context.device.index] if context.device.type == "cuda" else None)


def prepare(args: argparse.Namespace) -> Run:
    check_options(args)
    context = distributed.setup(args.device)
    seed_everything(args.seed + context.rank)
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_loader, train_set = make_train_loader(args, context)
    class_names = train_set.class_names
    arguments = arch_args(args, len(class_names))
    bare_model, encoder_source = build_pretrained_model(args, arguments, class_names)
    val_loader = make_val_loader(args, context, bare_model)
    never_predict(bare_model, never_labelled_ids(class_names))
    bare_model = bare_model.to(context.device, memory_format=torch.channels_last)
    if context.distributed and context.device.type == "cuda":
        bare_model = nn.SyncBatchNorm.convert_sync_batchnorm(bare_model)
    set_encoder_trainable(bare_model, args.freeze_encoder_epochs == 0)
    model = distribute(bare_model, context)
    # A randomly initialised encoder has nothing to preserve: it learns at the decoder's rate.
    encoder_lr_factor = args.encoder_lr_factor if args.encoder_weights else 1.0
    optimizer = torch.optim.Adam(parameter_groups(bare_model, args.lr, encoder_lr_factor))
    steps = args.epochs * min(len(train_loader), args.max_steps or len(train_loader))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    input_size = args.input_size or args.crop_size
    meta = model_meta(args.model, arguments, class_names, [input_size, input_size],
                      list(IMAGENET_MEAN), list(IMAGENET_STD))
    if encoder_source:
        meta["encoder_weights"] = encoder_source
    return Run(args, context, model, bare_model, train_loader, val_loader,
               make_criterion(args, len(class_names), context.device), optimizer, scheduler,
               torch.amp.GradScaler("cuda", enabled=context.device.type == "cuda" and args.precision == "auto"), meta,
               make_distillation(args, class_names, context.device))
