"""Turning an upload into a safe RGB image, or a clear error with the right HTTP status."""
from __future__ import annotations

import io
import warnings

from flask import Request
from PIL import Image, UnidentifiedImageError

from utils.fileio import to_rgb

IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


class UploadError(Exception):
    """A client error: ``status`` is the HTTP code, the message is shown to the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def upload_bytes(request: Request) -> bytes:
    """The image bytes: the multipart field ``file``, or else the raw request body."""
    if request.files:
        upload = request.files.get("file")
        if upload is None:
            raise UploadError("no file field named 'file' in the form")
        data = upload.read()
    elif request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UploadError("no file uploaded: choose an image in the field 'file'")
    else:
        data = request.get_data(cache=False)
    if not data:
        raise UploadError("the upload is empty: send an image file")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` into RGB, checking the pixel count from the header before decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UploadError(f"image too large: {error}", 413) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if data.startswith(IMAGE_SIGNATURES) or data[8:12] == b"WEBP":
            raise UploadError("the image is corrupt or truncated (its header cannot be read)") from error
        raise UploadError("not an image we can read (send a JPEG, PNG, WebP, GIF, BMP or TIFF)") from error
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(f"image too large: {width}x{height} pixels is over the limit of {max_pixels:,}", 413)
    try:
        image.seek(0)  # animations: the first frame
        image.load()
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UploadError(f"the image is corrupt or truncated ({error})") from error
