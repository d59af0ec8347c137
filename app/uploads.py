"""Turning an upload into a safe RGB image, or a clear error with the right HTTP status.

Only the photo formats of the page and the README are ever opened: JPEG (with MPO, the
multi-picture JPEG of some cameras), PNG, WebP, GIF, BMP and TIFF.  Pillow knows about 40 more
formats, several of which unpack without a size limit or hand the file to another program
(FITS, ICNS, EPS through Ghostscript); those never reach a decoder.  Memory is bounded by the
pixel limit, checked on the header before any pixel is decoded and again on what was decoded;
only the first frame of an animation is decoded.
"""
from __future__ import annotations

import io
import struct

from flask import Request
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from utils.fileio import to_rgb

# Pillow's format -> the name people know it by.  Pillow's JPEG opener also reads MPO.
ACCEPTED = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF"}
ACCEPTED_FORMATS = tuple(ACCEPTED)
ACCEPTED_NAMES = ", ".join(list(ACCEPTED.values())[:-1]) + " or " + list(ACCEPTED.values())[-1]
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# What the decoders of the accepted formats raise on a malformed file: beyond OSError, some
# plugins read past the end of a truncated header (EOFError, struct.error) or index a table
# the file promised but did not carry.
DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError)
# A PNG's text chunks are unpacked at open, up to 64 MB by default, whatever its pixel count; a
# photo needs none of them (Pillow then refuses the file: a 400).
PngImagePlugin.MAX_TEXT_MEMORY = 1 << 20


class UploadError(Exception):
    """A client error: ``status`` is the HTTP code, the message is shown to the client, ``reason``
    labels the refusal in the metrics (``seg_uploads_refused_total``)."""

    def __init__(self, message: str, status: int = 400, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def upload_bytes(request: Request) -> bytes:
    """The image bytes: the multipart field ``file``, or else the raw request body."""
    if request.files:
        upload = request.files.get("file")
        if upload is None:
            raise UploadError("no file field named 'file' in the form", reason="no_image")
        data = upload.read()
    elif request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UploadError("no file uploaded: choose an image in the field 'file'", reason="no_image")
    else:
        data = request.get_data(cache=False)
    if not data:
        raise UploadError("the upload is empty: send an image file", reason="no_image")
    return data


def looks_accepted(data: bytes) -> bool:
    """True when ``data`` starts like one of the accepted formats (so a failure means corrupt)."""
    return data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def open_accepted(data: bytes) -> Image.Image:
    """The image's header, read by the plugins of the accepted formats only."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as error:  # past twice Pillow's own pixel limit
        raise UploadError(f"image too large: {error}", 413, "too_many_pixels") from error
    except UnidentifiedImageError as error:
        if looks_accepted(data):
            raise UploadError("the image is corrupt or truncated (its header cannot be read)") from error
        raise UploadError(f"not an image format we read: send a {ACCEPTED_NAMES} file", 415,
                          "unsupported_format") from error
    except DECODER_ERRORS as error:
        raise UploadError(f"the image is corrupt or truncated ({error})") from error


def check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(f"image too large: {width}x{height} pixels is over the limit of {max_pixels:,}", 413,
                          "too_many_pixels")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` into RGB: the pixel count is checked from the header before any pixel is
    decoded, and on the decoded image before it is converted."""
    image = open_accepted(data)
    check_pixels(image, max_pixels)
    try:
        image.seek(0)  # animations: the first frame only
        image.load()
        check_pixels(image, max_pixels)  # a plugin may only learn the real size while decoding
        return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise UploadError(f"image too large: {error}", 413, "too_many_pixels") from error
    except DECODER_ERRORS as error:
        raise UploadError(f"the image is corrupt or truncated ({error})") from error
