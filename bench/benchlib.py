"""What the bench scripts share: the repository on sys.path, a test photo, medians, the machine."""
from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
# A real 640x480 COCO photo: JPEG decoding and the class maps behave as they do on real uploads.
PHOTO = SHARED / "coco128" / "train2017" / "000000000009.jpg"

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A ``width`` x ``height`` JPEG: the COCO photo resized, or smooth noise when it is absent."""
    if PHOTO.is_file():
        image = Image.open(PHOTO).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    else:
        coarse = np.random.default_rng(0).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def seconds_of(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def median_ms(function: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    return statistics.median(seconds_of(function) for _ in range(repeat)) * 1000


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def machine() -> str:
    """One line: CPU model, cores, the SIMD flags that matter for inference, Python and torch."""
    import torch

    from utils.precision import cpu_description

    return (f"{cpu_description()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def busy_fraction(seconds: float = 1.0) -> float:
    """How busy all cores were over the next ``seconds`` (from /proc/stat; idle and iowait count as idle)."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]
    total, idle = ticks()
    time.sleep(seconds)
    total_after, idle_after = ticks()
    return 1 - (idle_after - idle) / max(1, total_after - total)


def background_load() -> str:
    """A warning when something else is using the CPU, which would spoil the figures.  (Not the
    load average: it lags by minutes, so it would still show the previous benchmark.)"""
    busy = busy_fraction()
    return f"WARNING: the cores were {busy:.0%} busy before the run: other work shares them\n" if busy > 0.1 else ""


@contextlib.contextmanager
def checkout_of(revision: str) -> Iterator[Path]:
    """``revision`` in a git worktree beside this checkout (so ../shared is where the code looks for
    it), removed afterwards."""
    worktree = Path(tempfile.mkdtemp(prefix=".bench-base-", dir=ROOT.parent))  # git takes an empty folder
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), revision], cwd=ROOT, check=True)
    try:
        yield worktree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=True)


def base_against_head(revision: str, rounds: int, measure: Callable[[Path, str], float], unit: str) -> None:
    """``measure(tree, label)`` at ``revision`` and at this checkout, rounds alternating (this
    machine's speed drifts within minutes), then the medians and their ratio."""
    print(background_load() + machine(), flush=True)
    base, head = [], []
    with checkout_of(revision) as worktree:
        for _ in range(rounds):
            base.append(measure(worktree, "base"))
            head.append(measure(ROOT, "head"))
    base_median, head_median = statistics.median(base), statistics.median(head)
    print(f"base {revision}: median {base_median:.2f} {unit}; head: median {head_median:.2f} {unit}")
    print(f"ratio: {base_median / head_median:.2f}")
