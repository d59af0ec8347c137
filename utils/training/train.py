"""train.py's engine: the epoch loop over a prepared run, for one CPU, one GPU or many processes under torchrun."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from model import main_logits
from utils import distributed
from utils.checkpoint import save_checkpoint
from utils.evaluation.loop import evaluate
from utils.evaluation.plots import plot_training_curves
from utils.precision import autocast
from utils.training.distillation import GroupedDistillation
from utils.training.prepare import Run, distribute, prepare, set_encoder_trainable
from utils.training.state import append_log, is_better, plain_config, resume, training_checkpoint, trim_log

log = logging.getLogger("train")


LOSS_SHOWN_EVERY = 20  # steps: reading the loss waits for the GPU, so the progress bar reads it rarely


def compute_loss(criterion: nn.Module, outputs: torch.Tensor | dict, target: torch.Tensor) -> torch.Tensor:
    """The main loss, plus half the auxiliary head's loss when the model has one."""
    loss = criterion(main_logits(outputs), target)
    if isinstance(outputs, dict) and "aux" in outputs:
        loss = loss + 0.5 * criterion(outputs["aux"], target)
    return loss


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
