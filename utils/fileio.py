"""Atomic file writes and robust image reading."""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    A reader never sees a half-written file, and a crash leaves at most a ``.tmp`` file
    that the next run overwrites or ignores.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and thread, so concurrent writers of one file never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as .npy atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class ImageReadError(UserError):
    """The file is not an image we can read."""


EXIF_ORIENTATION = 0x0112
ROWS_PER_BAND = 256  # 16-bit images are scaled to 8 bits a band of rows at a time: bounded temporaries


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (EXIF-rotated, palette, alpha, CMYK, 16-bit, grayscale) as 8-bit RGB.

    Memory matters here (uploads of up to tens of megapixels): an RGB image that needs no
    rotation is returned as it is, and no step holds more than one full-size copy beside the input.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = scaled_to_8_bits(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        if image.mode != "RGBA":  # convert() would copy an RGBA image all the same
            image = image.convert("RGBA")
        on_white = Image.new("RGB", image.size, (255, 255, 255))
        on_white.paste(image, mask=image)  # an RGBA mask is its alpha band, without a copy of it
        return on_white
    return image if image.mode == "RGB" else image.convert("RGB")


def scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """16/32-bit or float grayscale scaled to 8 bits by its peak (rather than clipped at 255)."""
    array = np.asarray(image)
    peak = max(float(np.nanmax(array)) if array.dtype.kind == "f" else float(array.max()), 255.0)
    scaled = np.empty(array.shape, dtype=np.uint8)
    for start in range(0, array.shape[0], ROWS_PER_BAND):
        band = array[start:start + ROWS_PER_BAND].astype(np.float64)
        scaled[start:start + ROWS_PER_BAND] = np.clip(np.nan_to_num(band * (255.0 / peak)), 0, 255)
    return Image.fromarray(scaled)


def displayed_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        transposed = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (width, height) if transposed else (height, width)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file by its content (not its extension) as 8-bit RGB."""
    try:
        with Image.open(path) as image:
            image.seek(0)  # first frame of animations
            image.load()
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb  # closing the file frees the image it opened
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
