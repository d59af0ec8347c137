"""What each kind of upload costs the worker that reads it: the answer and the peak memory.

    python bench/uploads.py [--checkpoint FILE] [--megapixels 0.3 12 40] [--root CHECKOUT]

Starts gunicorn (1 worker) on a free loopback port, then posts to /json, one at a time, the
hostile files of tests/hostile_images.py (formats Pillow can open but the service must not) and
photo-like JPEGs of the sizes given.  Before each request the worker's peak resident size is
reset (/proc/<pid>/clear_refs), so the figure is what that request alone added to the worker.
``--root`` serves another checkout's app (for example an older commit) with this script's files.
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import requests
from benchlib import ROOT, machine
from PIL import Image
from serve import Service

from app.settings import DEFAULT_CHECKPOINT
from tests.hostile_images import HOSTILE

MiB = 1 << 20


def photo(megapixels: float) -> bytes:
    """A smooth, photo-like JPEG of about ``megapixels`` at 4:3."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    coarse = np.random.default_rng(0).integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"error: no {field} for process {pid}")


def post_measured(url: str, pid: int, data: bytes) -> tuple[requests.Response, float]:
    """The answer to ``data``, and how far the worker's peak RSS rose above its RSS before (MiB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = status_kib(pid, "VmRSS")
    response = requests.post(url + "/json", files={"file": ("upload", data)}, timeout=600)
    return response, (status_kib(pid, "VmHWM") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--megapixels", type=float, nargs="*", default=[0.3, 12, 40])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose app is served")
    args = parser.parse_args()
    print(machine())
    uploads = {name: (build(), what) for name, (build, what) in HOSTILE.items()}
    uploads.update({f"photo-{mp:g}mp": (photo(mp), f"JPEG photo, {mp:g} Mpixel") for mp in args.megapixels})
    with tempfile.TemporaryDirectory() as results, \
            Service(args.checkpoint, 1, 2, "auto", Path(results), root=args.root) as service:
        service.wait_until_loaded()
        (pid,) = service.worker_pids()
        requests.post(service.url + "/json", files={"file": ("warm.jpg", photo(0.3))}, timeout=600)  # first-use costs
        print(f"{'upload':<16} {'what':<46} {'bytes':>10} {'status':>6} {'peak +MiB':>9}  answer")
        photos = []  # (pixels, peak growth in MiB) of the photos answered
        for name, (data, what) in uploads.items():
            response, growth = post_measured(service.url, pid, data)
            body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
            answer = body.get("error") or (f"{body['width']}x{body['height']}" if "width" in body else response.text)
            print(f"{name:<16} {what:<46} {len(data):>10,} {response.status_code:>6} {growth:>9.0f}  {answer[:70]}")
            if name.startswith("photo-") and "width" in body:
                photos.append((body["width"] * body["height"], growth))
    if len(photos) >= 2:
        (small, low), (large, high) = min(photos), max(photos)
        print(f"photos: peak +{low - small * (high - low) / (large - small):.0f} MiB "
              f"+ {(high - low) * MiB / (large - small):.1f} bytes a pixel (from the smallest and largest)")


if __name__ == "__main__":
    main()
