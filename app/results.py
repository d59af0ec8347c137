"""Result images on disk: random unguessable names, atomic writes, bounded count and age."""
from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from PIL import Image

from utils.fileio import atomic_path

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{22}\.jpg$")


def is_result_name(name: str) -> bool:
    """Only names this module makes; anything else (paths, dots, other files) is refused."""
    return bool(NAME_PATTERN.fullmatch(name))


def save_result(image: Image.Image, folder: Path) -> str:
    """Write ``image`` as JPEG under a fresh random name (JPEG: ~1 ms, PNG ~80 ms)."""
    name = secrets.token_urlsafe(16) + ".jpg"
    with atomic_path(folder / name) as tmp:
        image.save(tmp, format="JPEG", quality=88)
    return name


def prune_results(folder: Path, keep: int, max_age_s: int) -> int:
    """Delete results beyond the newest ``keep`` or older than ``max_age_s``; returns how many."""
    now = time.time()
    files = []
    for path in folder.glob("*.jpg"):
        try:
            files.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # another worker pruned it first
            continue
    files.sort(reverse=True)
    doomed = [p for i, (mtime, p) in enumerate(files) if i >= keep or now - mtime > max_age_s]
    for path in doomed:
        path.unlink(missing_ok=True)
    return len(doomed)
