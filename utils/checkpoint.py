"""Checkpoints that describe themselves.

A checkpoint is a plain dict saved with ``torch.save`` and loaded with ``weights_only=True``:

    {"model": state_dict,
     "meta": {"arch": "unet", "arch_args": {...}, "num_classes": 91,
              "class_names": [...], "input_size": [H, W], "mean": [...], "std": [...],
              "ignore_index": 255, "metrics": {...}},
     # training state, present in training checkpoints only:
     "optimizer": ..., "scheduler": ..., "scaler": ..., "epoch": int,
     "best_metric": float, "config": {...}}

``meta`` alone is enough to rebuild the model (see ``model.build_from_meta``) and to
preprocess its input, so a checkpoint can be served or evaluated on its own.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from utils.errors import UserError
from utils.fileio import atomic_path

META_KEYS = ("arch", "arch_args", "num_classes", "class_names", "input_size", "mean", "std")


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or lacks what we need."""


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Save atomically, so an interrupted save never replaces a good file with a broken one."""
    missing = [key for key in META_KEYS if key not in checkpoint.get("meta", {})]
    if "model" not in checkpoint or missing:
        raise CheckpointError(f"refusing to save a checkpoint without model/meta {missing}")
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a bare state dict, or one under ``model`` or ``state_dict``.

    Loaded weights-only, so a file whose pickle would run code is refused, not executed.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt, foreign or unsafe files
        raise CheckpointError(f"cannot load weights from {path}: {str(error).splitlines()[0]}") from error
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check its metadata."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"cannot load checkpoint {path}: {error}") from error
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model/meta)")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks metadata: {', '.join(missing)}")
    return checkpoint
