"""What a training checkpoint holds, resuming from one, and the CSV log beside it."""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from utils.checkpoint import CheckpointError, load_checkpoint
from utils.fileio import atomic_path, write_text
from utils.training.prepare import Run

log = logging.getLogger("train")


LOG_FIELDS = ("epoch", "train_loss", "val_loss", "pixel_accuracy", "miou", "lr", "seconds")


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
