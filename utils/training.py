"""The one train / evaluate loop, for one CPU, one GPU or many processes under torchrun."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from model import build_model, load_pretrained, main_logits, min_input_size, model_meta, never_predict
from model.deeplab_voc import load_voc_teacher
from model.encoder_weights import load_encoder_weights
from model.smp_models import load_voc_head
from model.unet import UNet
from utils import distributed
from utils.augment import train_transform
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.classes import VOC_CLASSES, never_labelled_ids
from utils.datasets import PairedDataset, build_dataset
from utils.distillation import GroupedDistillation
from utils.fileio import atomic_path, write_text
from utils.losses import build_loss, class_weights_from_counts
from utils.metrics import ConfusionMatrix
from utils.plots import plot_training_curves
from utils.precision import autocast
from utils.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

log = logging.getLogger("train")


class TrainingError(ValueError):
    """The run cannot start as configured; the message says what to change."""


LOG_FIELDS = ("epoch", "train_loss", "val_loss", "pixel_accuracy", "miou", "lr", "seconds")
LOSS_SHOWN_EVERY = 20  # steps: reading the loss waits for the GPU, so the progress bar reads it rarely


def compute_loss(criterion: nn.Module, outputs: torch.Tensor | dict, target: torch.Tensor) -> torch.Tensor:
    """The main loss, plus half the auxiliary head's loss when the model has one."""
    loss = criterion(main_logits(outputs), target)
    if isinstance(outputs, dict) and "aux" in outputs:
        loss = loss + 0.5 * criterion(outputs["aux"], target)
    return loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                    context: distributed.Context, epoch: int, max_steps: int | None,
                    precision: str = "auto", distillation: GroupedDistillation | None = None) -> float:
    """One pass over ``loader`` (at most ``max_steps`` batches); the mean loss over all ranks.
    With ``distillation``, its loss is added to the criterion's."""
    model.train()
    device = context.device
    total = torch.zeros(2, device=device)
    steps = min(len(loader), max_steps or len(loader))
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch}", disable=not context.is_main, dynamic_ncols=True)
    for step, (images, masks) in enumerate(bar):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, precision):
            outputs = model(images)
            loss = compute_loss(criterion, outputs, masks)
            if distillation is not None:
                loss = loss + distillation(images, main_logits(outputs), masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += torch.stack([loss.detach().float(), torch.ones((), device=device)])
        if step % LOSS_SHOWN_EVERY == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    distributed.all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


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


# ------------------------------------------------------------------------------ set-up


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


def arch_args(args: argparse.Namespace, num_classes: int) -> dict:
    """The constructor arguments of ``args.model`` (what the checkpoint records to rebuild it)."""
    arguments = {"num_classes": num_classes}
    if args.model == "unet":
        arguments.update(base_width=args.base_width, bilinear=not args.transposed)
        # Variants are recorded only when chosen, so runs and checkpoints from before they existed
        # (the defaults) still match on --resume.
        arguments.update(chosen_unet_variants(args))
    elif args.model == "segnet":
        arguments.update(base_width=args.base_width)
    elif args.model == "smp_unet":
        arguments.update(encoder=args.encoder, encoder_output_stride=args.encoder_output_stride)
        if args.voc_head:
            arguments.update(voc_head=True)
    elif args.model.startswith("smp_"):
        arguments.update(encoder=args.encoder)
    elif args.model.startswith("deeplabv3plus"):
        arguments.update(output_stride=args.output_stride)
    elif args.model.startswith(("deeplabv3_", "fcn_")):
        arguments.update(aux_loss=args.aux_loss)
    return arguments


def chosen_unet_variants(args: argparse.Namespace) -> dict:
    """The classic U-Net's variant options that differ from its defaults."""
    variants = {"padding_mode": args.padding_mode, "dropout": args.dropout, "activation": args.activation}
    defaults = inspect.signature(UNet).parameters
    return {k: v for k, v in variants.items() if v != defaults[k].default}


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


def check_batch_size(args: argparse.Namespace) -> None:
    if args.model.startswith("deeplabv3_") or args.model == "deeplabv3plus_xception":
        if args.batch_size < 2:
            raise TrainingError(f"{args.model} has BatchNorm after global pooling, which cannot train on "
                                "one image per batch: use --batch-size 2 or more")


def build_pretrained_model(args: argparse.Namespace, arguments: dict,
                           class_names: list[str]) -> tuple[nn.Module, dict | None]:
    """The model with any pretrained weights asked for; and where its encoder's weights came from."""
    encoder_source = None
    try:
        model = build_model(args.model, **arguments)
        if args.weights:
            log.info("pretrained weights: %s", load_pretrained(model, args.weights))
        if args.encoder_weights:
            encoder_source = load_encoder_weights(model, args.encoder_weights, arguments.get("encoder", "")).as_meta()
            if not args.train_encoder_bn:
                model.freeze_encoder_batchnorm()
        if args.voc_head:
            log.info("%s", load_voc_head(model, args.voc_head, class_names))
    except CheckpointError:
        raise
    except (ValueError, OSError, RuntimeError) as error:
        raise TrainingError(str(error)) from error
    return model, encoder_source


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
    try:
        return GroupedDistillation(load_voc_teacher(args.distill_from), VOC_CLASSES, class_names,
                                   args.distill_weight).to(device, memory_format=torch.channels_last)
    except ValueError as error:
        raise TrainingError(str(error)) from error


def check_options(args: argparse.Namespace) -> None:
    check_batch_size(args)
    if (args.encoder_weights or args.freeze_encoder_epochs) and not args.model.startswith("smp_"):
        raise TrainingError("--encoder-weights and --freeze-encoder-epochs need an encoder model (--model smp_...)")
    if (args.encoder_output_stride != 32 or args.voc_head) and args.model != "smp_unet":
        raise TrainingError("--encoder-output-stride 16 and --voc-head are offered for --model smp_unet only")
    if args.voc_head and not args.encoder_weights:
        # The VOC head reads the encoder's block-17 features: behind a random encoder it reads noise.
        raise TrainingError("--voc-head needs the encoder it was trained on: add --encoder-weights "
                            "with the same DeepLab file")
    if (chosen_unet_variants(args) or args.transposed) and args.model != "unet":
        raise TrainingError("--padding-mode, --dropout, --activation and --transposed are options of "
                            "--model unet only")


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


# ------------------------------------------------------------------------------ checkpoints


def training_checkpoint(run: Run, epoch: int, metrics: dict | None) -> dict:
    meta = dict(run.meta, metrics=metrics or {})
    return {"model": run.bare_model.state_dict(), "meta": meta, "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
            "best_metric": run.best_metric, "config": plain_config(run.args)}


def plain_config(args: argparse.Namespace) -> dict:
    """The arguments as plain types, so ``weights_only`` loading accepts them."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in vars(args).items()}


def resume(run: Run, path: Path) -> None:
    """Continue from ``path``: weights, optimiser, schedule, scaler and epoch count."""
    checkpoint = load_checkpoint(path, map_location=run.context.device)
    saved = (checkpoint["meta"]["arch"], checkpoint["meta"]["arch_args"])
    if saved != (run.meta["arch"], run.meta["arch_args"]):
        raise CheckpointError(f"{path} holds {saved[0]} {saved[1]}, but this run builds "
                              f"{run.meta['arch']} {run.meta['arch_args']}: use the same model options "
                              "or another --save-dir")
    if "optimizer" not in checkpoint:
        raise CheckpointError(f"{path} has no training state to resume from")
    run.bare_model.load_state_dict(checkpoint["model"])
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:  # e.g. a checkpoint of a model that has since lost unused parameters
        raise CheckpointError(f"{path}: its optimiser state does not fit this model ({error}); "
                              "train again, or start from its weights with --weights") from error
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"] and run.scaler.is_enabled():  # {} from a run without loss scaling
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.start_epoch = checkpoint["epoch"] + 1
    run.best_metric = checkpoint["best_metric"]
    run.last_metrics = checkpoint["meta"].get("metrics") or None
    log.info("resumed from %s at epoch %d", path, checkpoint["epoch"])


def is_better(run: Run, metrics: dict) -> bool:
    """Best by validation mIoU (higher) or, with --best-by loss, validation loss (lower)."""
    if run.args.best_by == "loss":
        value = -metrics["val_loss"]
    else:
        value = metrics["miou"] if metrics["miou"] is not None else -math.inf
    if run.best_metric is None or value > run.best_metric:
        run.best_metric = value
        return True
    return False


def trim_log(path: Path, last_epoch: int) -> None:
    """Drop rows after ``last_epoch``: a run killed between logging and saving logged one too many."""
    if not path.exists():
        return
    header, *rows = path.read_text().splitlines()
    kept = [row for row in rows if int(row.split(",", 1)[0]) <= last_epoch]
    write_text(path, "\n".join([header, *kept]) + "\n")


def append_log(path: Path, row: dict) -> None:
    """Add one epoch to the CSV log, rewriting it atomically."""
    previous = path.read_text() if path.exists() else ",".join(LOG_FIELDS) + "\n"
    line = ",".join("" if row.get(f) is None else str(row[f]) for f in LOG_FIELDS)
    with atomic_path(path) as tmp:
        tmp.write_text(previous + line + "\n")


# ------------------------------------------------------------------------------ the run


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def run_epoch(run: Run, epoch: int) -> dict:
    args, context = run.args, run.context
    if isinstance(run.train_loader.sampler, DistributedSampler):
        run.train_loader.sampler.set_epoch(epoch)
    started = time.time()
    if set_encoder_trainable(run.bare_model, epoch > args.freeze_encoder_epochs):
        run.model = distribute(run.bare_model, context)
    row = {"epoch": epoch, "lr": f"{run.scheduler.get_last_lr()[0]:.3e}",
           "train_loss": round(train_one_epoch(run.model, run.train_loader, run.criterion, run.optimizer,
                                               run.scheduler, run.scaler, context, epoch, args.max_steps,
                                               args.precision, run.distillation), 5)}
    if epoch % args.val_every == 0 or epoch == args.epochs:
        matrix, val_loss = evaluate(run.bare_model, run.val_loader, len(run.meta["class_names"]), context,
                                    run.criterion, args.precision)
        metrics = matrix.compute()
        row.update(val_loss=round(val_loss, 5), pixel_accuracy=rounded(metrics["pixel_accuracy"]),
                   miou=rounded(metrics["miou"]))
        log.info("epoch %d: loss %.4f, val loss %.4f, pixel acc %.4f, mIoU %s over %d classes", epoch,
                 row["train_loss"], val_loss, metrics["pixel_accuracy"], row["miou"],
                 len(metrics["classes_counted"]))
    row["seconds"] = round(time.time() - started, 1)
    return row


def save_epoch(run: Run, epoch: int, row: dict) -> None:
    """Rank 0 writes last.pth every epoch and best.pth when validation improves."""
    save_dir = Path(run.args.save_dir)
    improved = "val_loss" in row and is_better(run, row)
    if "val_loss" in row:
        run.last_metrics = {k: row[k] for k in ("pixel_accuracy", "miou", "val_loss")}
    checkpoint = training_checkpoint(run, epoch, run.last_metrics)
    append_log(save_dir / "log_train.csv", row)  # before last.pth: a resume trims what last.pth lacks
    if improved:
        save_checkpoint(save_dir / "best.pth", checkpoint)
        log.info("new best (%s) saved to %s", run.args.best_by, save_dir / "best.pth")
    save_checkpoint(save_dir / "last.pth", checkpoint)
    if "val_loss" in row:  # redrawn when there is something new to see (drawing costs ~0.5 s)
        plot_training_curves(save_dir / "log_train.csv", save_dir / "curves.png")


def train(args: argparse.Namespace) -> Path:
    """Train as ``args`` say; returns the path of the final checkpoint."""
    run = prepare(args)
    save_dir = Path(args.save_dir)
    try:
        if args.resume:
            resume(run, save_dir / "last.pth")
            if run.context.is_main:
                trim_log(save_dir / "log_train.csv", run.start_epoch - 1)
        for epoch in range(run.start_epoch, args.epochs + 1):
            row = run_epoch(run, epoch)
            if run.context.is_main:
                save_epoch(run, epoch, row)
        final = save_dir / "model_final.pth"
        if run.context.is_main:
            meta = dict(run.meta, metrics=run.last_metrics or {})
            save_checkpoint(final, {"model": run.bare_model.state_dict(), "meta": meta, "config": plain_config(args)})
            log.info("final model saved to %s", final)
        return final
    finally:
        distributed.cleanup()
