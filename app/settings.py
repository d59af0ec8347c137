"""Service configuration, read from the environment (``SEG_*``) with defaults that work out of the box."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from utils.inference.predictor import SERVING_BACKENDS, SERVING_PRECISIONS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "save" / "default" / "model.pth"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw not in (None, "") else default
    except ValueError as error:
        raise SystemExit(f"{name}={raw!r} is not a whole number") from error


def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name) or default
    if raw not in choices:
        raise SystemExit(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _hosts(name: str, default: str) -> list[str]:
    return [host.strip() for host in (os.environ.get(name) or default).split(",") if host.strip()]


def _device() -> str:
    """SEG_DEVICE (cpu, cuda, cuda:i); by default gunicorn worker i (SEG_WORKER_INDEX, set by
    app/gunicorn.conf.py's post_fork) takes GPU i mod n, and a host without a GPU the CPU."""
    raw = os.environ.get("SEG_DEVICE")
    gpus = torch.cuda.device_count()
    if not raw:
        return f"cuda:{_int('SEG_WORKER_INDEX', 0) % gpus}" if gpus else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", raw)
    if not match or (raw != "cpu" and int(match.group(1) or 0) >= gpus):
        raise SystemExit(f"SEG_DEVICE={raw!r} is not cpu or cuda[:i] of the {gpus} GPU(s) here")
    return raw


def from_environment() -> dict:
    """Flask config keys for the service; see README 'Serving' for each variable."""
    threads = os.environ.get("SEG_THREADS")
    return {
        "CHECKPOINT": os.environ.get("SEG_CHECKPOINT") or str(DEFAULT_CHECKPOINT),
        "RESULTS_DIR": os.environ.get("SEG_RESULTS_DIR") or str(ROOT / "save" / "results"),
        "RESULTS_KEEP": _int("SEG_RESULTS_KEEP", 500),
        "RESULTS_MAX_AGE_S": _int("SEG_RESULTS_MAX_AGE_S", 24 * 3600),
        "RESULTS_MAX_BYTES": _int("SEG_RESULTS_MAX_BYTES", 2 * 1024**3),
        "RESULTS_PRUNE_INTERVAL_S": _int("SEG_RESULTS_PRUNE_INTERVAL_S", 1),
        "RESULTS_MIN_FREE_BYTES": _int("SEG_RESULTS_MIN_FREE_BYTES", 256 * 1024**2),
        "RESULT_URL_TTL_S": _int("SEG_RESULT_URL_TTL_S", 3600),
        # Flask answers 400 to any other Host header, so no URL the service makes names a forged host.
        "TRUSTED_HOSTS": _hosts("SEG_ALLOWED_HOSTS", "localhost,127.0.0.1"),
        "MAX_CONTENT_LENGTH": _int("SEG_MAX_BYTES", 20 * 1024 * 1024),
        "MAX_PIXELS": _int("SEG_MAX_PIXELS", 40_000_000),
        # Network passes per request (slide mode's tiles x TTA's views): with the default model's 640
        # tiles 64 slide a 3000x2250 photo (45 passes), not 4000x3000 (91: about a minute on 2 cores).
        "MAX_FORWARDS": _int("SEG_MAX_FORWARDS", 64),
        "TORCH_THREADS": int(threads) if threads else None,
        "PRECISION": _choice("SEG_PRECISION", SERVING_PRECISIONS, "auto"),
        "BACKEND": _choice("SEG_BACKEND", SERVING_BACKENDS, "auto"),
        "DEVICE": _device(),
        "COMPILE": os.environ.get("SEG_COMPILE", "0") == "1",
        "API_TOKEN": os.environ.get("SEG_API_TOKEN") or None,
        "PAGE_PUBLIC": os.environ.get("SEG_PAGE_PUBLIC", "0") == "1",
        "LOAD_MODEL_AT_START": os.environ.get("SEG_LOAD_MODEL_AT_START", "1") == "1",
    }
