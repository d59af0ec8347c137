"""Result files on disk: random unguessable names, atomic writes, bounded count and age.

One result is a group of files that share a random id: ``<id>.jpg`` (the overlay), ``<id>.png``
(the class ids), ``<id>.json`` (the API's answer) and, for the page, ``<id>.photo.jpg`` (the
decoded photo, so the page can show it beside the result in any upload format).  They are
kept and pruned together.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.drawing import class_map_image
from utils.fileio import atomic_path

SUFFIXES = {"overlay": ".jpg", "photo": ".photo.jpg", "mask": ".png", "json": ".json"}
NAME_PATTERN = re.compile(r"^([A-Za-z0-9_-]{22})(\.jpg|\.photo\.jpg|\.png|\.json)$")
MEDIA_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".json": "application/json"}
TEMPORARY_PATTERN = re.compile(r"^\.[A-Za-z0-9_-]{22}\..+\.tmp$")  # utils.fileio.atomic_path's, of a result file
WRITE_GRACE_S = 120  # a result younger than this without its JSON is still being written
# What one result may take on disk, per pixel of the photo: two JPEGs of noise-like photos take up
# to ~3 bytes a pixel each, the class-id PNG and the RLE JSON of a fragmented map up to ~1 each.
BYTES_PER_PIXEL_BOUND = 8
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ResultsFull(Exception):
    """The results folder's disk has no room for another result."""


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def ensure_room(folder: Path, pixels: int, reserve: int) -> None:
    """Raise ``ResultsFull`` unless the disk has room for a result of ``pixels`` plus ``reserve`` bytes."""
    needed = pixels * BYTES_PER_PIXEL_BOUND + reserve
    if free_bytes(folder) < needed:
        raise ResultsFull(f"the server's disk is too full to store this result (it needs {needed:,} bytes free); "
                          "try again later")


def is_result_name(name: str) -> bool:
    """Only names this module makes; anything else (paths, dots, other files) is refused."""
    return bool(NAME_PATTERN.fullmatch(name))


def media_type(name: str) -> str:
    return MEDIA_TYPES[Path(name).suffix]


@dataclass(frozen=True)
class ResultFiles:
    """The files of one result in ``folder``; each is written atomically (readers never see half a file)."""
    folder: Path
    id: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    def name(self, kind: str) -> str:
        return self.id + SUFFIXES[kind]

    def path(self, kind: str) -> Path:
        return self.folder / self.name(kind)

    def save_jpeg(self, kind: str, image: Image.Image) -> None:
        """JPEG: ~1 ms for a 640x480 photo, where PNG takes ~80 ms."""
        with atomic_path(self.path(kind)) as tmp:
            image.save(tmp, format="JPEG", quality=88)

    def save_mask(self, class_map: np.ndarray) -> None:
        # zlib level 1: class maps are long runs that compress well even so, at a third of level 6's time.
        with atomic_path(self.path("mask")) as tmp:
            class_map_image(class_map).save(tmp, format="PNG", compress_level=1)

    def save_json(self, text: str) -> None:
        with atomic_path(self.path("json")) as tmp:
            tmp.write_text(text, encoding="utf-8")

    @contextlib.contextmanager
    def writing(self) -> Iterator[ResultFiles]:
        """Write the files of this result inside the block: should one fail, none is left."""
        try:
            yield self
        except BaseException as error:
            for kind in SUFFIXES:
                self.path(kind).unlink(missing_ok=True)
            if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
                raise ResultsFull("the server's disk is full: the result could not be stored; try again later") \
                    from error
            raise


class PruneSchedule:
    """Whether this process should prune now: at most once per ``interval_s`` (0: after every
    result).  A prune stats every result file, 9 ms at 500 results; after every request that was
    5 % of a prediction's time, for a count that may run over by at most an interval's results."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._next = 0.0
        self._lock = threading.Lock()

    def due(self) -> bool:
        with self._lock:
            now = self.clock()
            if now < self._next:
                return False
            self._next = now + self.interval_s
            return True


def prune_results(folder: Path, keep: int, max_age_s: int, max_bytes: int, current: str | None = None) -> int:
    """Delete whole results beyond the newest ``keep``, older than ``max_age_s`` or past ``max_bytes``
    in all (oldest go first); never ``current``, the result just written, nor one that another
    request is still writing.  Returns how many went.

    A result is dated by its overlay, which is written first, and complete once its JSON, written
    last, is there.  Files whose overlay is gone are what is left of a result another worker is
    pruning, and go too; so do temporary files that a killed worker left.
    """
    names, sizes, written, stale = scan_results(folder)
    now = time.time()
    spared = {result for result in names if result == current or in_progress(names[result], now - written[result])}
    ranked = sorted(names, key=lambda result: (result in spared, written[result]), reverse=True)
    doomed, kept_bytes, full = [], 0, False
    for rank, result in enumerate(ranked):
        full = full or (result not in spared and kept_bytes + sizes[result] > max_bytes)  # older ones go too
        if result not in spared and (full or rank >= keep or now - written[result] > max_age_s):
            doomed.append(result)
        else:
            kept_bytes += sizes[result]
    for name in [name for result in doomed for name in names[result]] + stale:
        (folder / name).unlink(missing_ok=True)
    return len(doomed)


def in_progress(names: list[str], age_s: float) -> bool:
    """A result with an overlay and no JSON yet, begun within the last WRITE_GRACE_S."""
    has = {name[22:] for name in names}
    return SUFFIXES["overlay"] in has and SUFFIXES["json"] not in has and age_s < WRITE_GRACE_S


def scan_results(folder: Path) -> tuple[dict[str, list[str]], dict[str, int], dict[str, float], list[str]]:
    """The results in ``folder`` (id -> file names, id -> bytes, id -> when its overlay was written)
    and its stale temporary files.  One stat per file: each worker runs this once per PruneSchedule
    interval at most, over up to RESULTS_KEEP results (a second stat per overlay made it 8.7 ms at 500 results)."""
    names: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    written: dict[str, float] = {}
    stale: list[str] = []
    now = time.time()
    with os.scandir(folder) as entries:
        for entry in entries:
            match = NAME_PATTERN.fullmatch(entry.name)
            if match:
                result, suffix = match.groups()
                size, mtime = size_and_mtime(entry)
                names.setdefault(result, []).append(entry.name)
                sizes[result] = sizes.get(result, 0) + size
                written[result] = mtime if suffix == SUFFIXES["overlay"] else written.get(result, 0.0)
            elif TEMPORARY_PATTERN.fullmatch(entry.name) and now - size_and_mtime(entry)[1] > WRITE_GRACE_S:
                stale.append(entry.name)
    return names, sizes, written, stale


def size_and_mtime(entry: os.DirEntry) -> tuple[int, float]:
    """The entry's size and modification time, or (0, 0.0: the distant past) when another worker
    has just removed it."""
    try:
        status = entry.stat()
    except FileNotFoundError:
        return 0, 0.0
    return status.st_size, status.st_mtime
