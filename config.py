"""Project defaults, in one place.

Every value can be overridden by an environment variable ``SEG_<NAME>`` (for example
``SEG_EPOCHS=10``) and, in the scripts, by the command-line option ``--<name>``
(for example ``--epochs 10``).  Command line beats environment beats the value here.
Paths are relative to the working directory: nothing here is machine-specific.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Defaults:
    # Data layout (COCO): <data_dir>/<split>2017/*.jpg, masks in <mask_dir>/<split>2017/*.npy
    data_dir: str = "data/coco"
    mask_dir: str = "data/coco/masks"
    save_dir: str = "save"
    num_classes: int = 91
    crop_size: int = 512
    # Optimisation (each architecture's own arguments and their defaults: model/registry.py)
    model: str = "unet"
    lr: float = 1e-4
    loss: str = "focal"
    focal_alpha: float = 0.9
    focal_gamma: float = 4.0
    epochs: int = 160
    batch_size: int = 8
    workers: int = min(4, os.cpu_count() or 1)
    seed: int = 0
    val_every: int = 1


DEFAULTS = Defaults()


def from_env(name: str, value):
    """``value``, or the environment's ``SEG_<NAME>`` read as the same type (str, int or float only:
    flags and optional files are chosen on the command line)."""
    raw = os.environ.get(f"SEG_{name.upper()}")
    if raw is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return value
    try:
        return type(value)(raw)
    except ValueError as error:
        raise SystemExit(f"SEG_{name.upper()}={raw!r} is not a valid {type(value).__name__}") from error


def get(name: str):
    """The default for ``name``, after environment overrides."""
    return from_env(name, getattr(DEFAULTS, name))


def add_arguments(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add ``--<name>`` options to ``parser`` with their (environment-aware) defaults."""
    known = {f.name for f in fields(Defaults)}
    for name in names:
        if name not in known:
            raise KeyError(f"config has no default named {name!r}")
        value = get(name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"(default: {value}; env SEG_{name.upper()})")
