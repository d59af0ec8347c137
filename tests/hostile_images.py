"""Uploads a stranger might send: files of formats Pillow can open but the service must not, built
here byte by byte (no file is shipped).  Used by tests/test_upload_formats.py and bench/uploads.py.

``python -m tests.hostile_images DIR`` writes each of them to DIR, to post by hand.
"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def fits_card(keyword: str, value: str) -> bytes:
    return f"{keyword:<8}= {value:>20}".ljust(80).encode()


def fits_header(cards: list[tuple[str, str]]) -> bytes:
    """A FITS header unit: 80-character cards, END, padded to a 2880-byte block."""
    unit = b"".join(fits_card(keyword, value) for keyword, value in cards) + b"END".ljust(80)
    return unit.ljust(-(-len(unit) // 2880) * 2880)


def gzip_of_zeros(size: int) -> bytes:
    """A gzip stream that unpacks to ``size`` zero bytes.  Deflate starts afresh after a full flush,
    so one compressed megabyte is repeated instead of compressing every megabyte again (1 GiB: 3 s
    of zlib level 9 before, AMD EPYC)."""
    megabytes, rest = divmod(size, 1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; the gzip wrapping is written here
    megabyte = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    tail = packer.compress(bytes(rest)) + packer.flush()
    checksum = 0
    for _ in range(megabytes):
        checksum = zlib.crc32(bytes(1 << 20), checksum)
    checksum = zlib.crc32(bytes(rest), checksum)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, no time, best, unknown OS
    return header + megabyte * megabytes + tail + struct.pack("<II", checksum, size & 0xFFFFFFFF)


def fits_gzip_bomb(unpacked_bytes: int = 200 << 20) -> bytes:
    """An 8x8 FITS image whose GZIP_1 tile unpacks to ``unpacked_bytes`` (CVE-2026-40192:
    Pillow before 12.2 read the whole stream, so 20 MB of upload became about 20 GB)."""
    primary = fits_header([("SIMPLE", "T"), ("BITPIX", "8"), ("NAXIS", "0"), ("EXTEND", "T")])
    table = fits_header([("XTENSION", "'BINTABLE'"), ("BITPIX", "8"), ("NAXIS", "2"), ("NAXIS1", "0"),
                         ("NAXIS2", "0"), ("ZIMAGE", "T"), ("ZCMPTYPE", "'GZIP_1  '"), ("ZBITPIX", "8"),
                         ("ZNAXIS", "2"), ("ZNAXIS1", "8"), ("ZNAXIS2", "8")])
    return primary + table + gzip_of_zeros(unpacked_bytes)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int) -> bytes:
    """A valid all-black RGB PNG of any size in little space (its rows compressed a few at a time)."""
    packer = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte + pixels
    rows_per_block = max(1, (1 << 20) // len(row))
    parts = [packer.compress(row * min(rows_per_block, height - done)) for done in range(0, height, rows_per_block)]
    data = b"".join(parts) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def icns_bomb(real_side: int = 8000) -> bytes:
    """An icon whose table says 1024x1024 ('ic10') but whose embedded PNG is ``real_side`` square:
    a header check passes, and the decoder then makes the large image."""
    png = blank_png(real_side, real_side)
    block = b"ic10" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(block)) + block


def eps() -> bytes:
    """Encapsulated PostScript: Pillow hands it to Ghostscript, running whatever it says."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"


def psd_truncated() -> bytes:
    """A Photoshop file whose layer table counts one layer and holds none (Pillow 11 answered
    seek(0) with an EOFError that no decoder error list caught)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 8, 8, 8, 3)  # version 1, 3 channels, 8x8, 8 bits, RGB
    layers = struct.pack(">h", 1)
    layer_and_mask = struct.pack(">I", len(layers)) + layers
    resources = struct.pack(">II", 0, 0)  # no colour-mode data, no image resources
    pixels = struct.pack(">H", 0) + bytes(8 * 8 * 3)  # raw, uncompressed
    return header + resources + struct.pack(">I", len(layer_and_mask)) + layer_and_mask + pixels


def spider_truncated() -> bytes:
    """A SPIDER image whose header says there is more than the file holds."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(buffer, format="SPIDER")
    return buffer.getvalue()[:-100]


def saved(format: str) -> bytes:
    """A small photo-like image in ``format``, saved by Pillow itself."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


# name -> (builder, what it is); bench/uploads.py posts every one of them
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "fits-gzip-bomb": (fits_gzip_bomb, "FITS, GZIP_1 tile unpacking to 200 MB"),
    "icns-bomb": (icns_bomb, "ICNS saying 1024x1024, embedded PNG 8000x8000"),
    "eps": (eps, "EPS (Ghostscript)"),
    "psd": (psd_truncated, "PSD, truncated"),
    "spider": (spider_truncated, "SPIDER, truncated"),
    **{name.lower(): (lambda name=name: saved(name), f"{name}, 32x24") for name in ("PPM", "PCX", "TGA", "ICO", "SGI")},
}


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for name, (build, _) in HOSTILE.items():
        (folder / name).write_bytes(build())
        print(folder / name)
