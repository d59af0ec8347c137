"""Uploads are read only in the formats we mean to read, within a memory bound that holds.

Peak memory is the process's peak resident size (VmHWM), reset just before the request through
/proc/self/clear_refs: it counts what Pillow's C decoders allocate, which tracemalloc cannot see.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from app.uploads import decode_image
from tests.hostile_images import HOSTILE, fits_gzip_bomb, gzip_of_zeros, icns_bomb
from tests.test_app import encoded, photo, post_file

MiB = 1 << 20
REFUSED_REQUEST_BOUND = 32 * MiB  # a refused upload costs its bytes and a little bookkeeping, nothing decoded


def peak_memory_supported() -> bool:
    try:
        reset_peak_memory()
        return True
    except OSError:
        return False


def reset_peak_memory() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def peak_growth(call) -> tuple[object, int]:
    """(``call()``, how far the peak resident size rose above the size before it, in bytes)."""
    if not peak_memory_supported():
        pytest.skip("peak memory needs Linux's /proc/self/clear_refs")
    reset_peak_memory()
    before = memory_kib("VmRSS")
    result = call()
    return result, (memory_kib("VmHWM") - before) * 1024


@pytest.fixture()
def client(make_client):
    return make_client()


@pytest.fixture(scope="module")
def hostile_files() -> dict[str, bytes]:
    return {name: build() for name, (build, _) in HOSTILE.items()}


def test_the_hostile_files_are_what_they_say_to_pillow(hostile_files):
    """Each file is opened by the plugin it targets when Pillow may choose freely (header only)."""
    formats = {"fits-gzip-bomb": "FITS", "icns-bomb": "ICNS", "eps": "EPS", "psd": "PSD", "spider": "SPIDER",
               "ppm": "PPM", "pcx": "PCX", "tga": "TGA", "ico": "ICO", "sgi": "SGI"}
    for name, data in hostile_files.items():
        assert Image.open(io.BytesIO(data)).format == formats[name], name
    assert Image.open(io.BytesIO(icns_bomb())).size == (1024, 1024)  # what a header check would see


@pytest.mark.parametrize("name", list(HOSTILE))
def test_other_formats_are_415s_naming_the_accepted_ones_and_cost_no_memory(client, hostile_files, name):
    client.get("/healthz")  # the first request's one-time costs are not the upload's
    response, growth = peak_growth(lambda: post_file(client, hostile_files[name], name=f"upload.{name}"))
    assert response.status_code == 415, response.get_json()
    assert response.get_json()["error"] == "not an image format we read: send a JPEG, PNG, WebP, GIF, BMP or TIFF file"
    assert growth < REFUSED_REQUEST_BOUND, f"{name}: peak memory rose by {growth / MiB:.0f} MiB"


@pytest.mark.parametrize("size", [0, 5, 1 << 20, (3 << 20) + 17])
def test_the_bomb_s_gzip_stream_unpacks_to_exactly_its_size(size):
    """The stream repeats one compressed megabyte: a stream that did not unpack would make the
    bomb test below pass for the wrong reason."""
    assert zlib.decompress(gzip_of_zeros(size), wbits=31) == bytes(size)


def test_the_fits_bomb_is_refused_however_much_it_unpacks_to(client):
    data = fits_gzip_bomb(unpacked_bytes=1 << 30)  # 1 GiB of zeros in 1 MB of upload
    response, growth = peak_growth(lambda: post_file(client, data, name="sky.fits"))
    assert response.status_code == 415 and growth < REFUSED_REQUEST_BOUND + len(data) * 4


def tiff_of(image: Image.Image) -> bytes:
    return encoded(image, "TIFF", compression="tiff_lzw")


@pytest.mark.parametrize("data", [
    encoded(photo(61, 37), "JPEG"), encoded(photo(61, 37), "PNG"), encoded(photo(61, 37), "WEBP"),
    encoded(photo(61, 37).convert("P"), "GIF"), encoded(photo(61, 37), "BMP"), tiff_of(photo(61, 37)),
    encoded(photo(61, 37), "MPO"),
], ids=["jpeg", "png", "webp", "gif", "bmp", "tiff", "mpo"])
def test_each_accepted_format_decodes_to_its_size(client, data):
    response = post_file(client, data, name="photo")
    assert response.status_code == 200, response.get_json()
    assert (response.get_json()["width"], response.get_json()["height"]) == (61, 37)


def gif_with_a_frame_larger_than_its_screen() -> bytes:
    """A GIF whose header (logical screen) says 10x10 and whose first frame is 300x200."""
    data = bytearray(encoded(photo(300, 200).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", 10, 10)
    return bytes(data)


def test_a_gif_is_judged_by_its_frame_not_its_screen():
    from app.uploads import UploadError

    with pytest.raises(UploadError, match="300x200 pixels is over the limit") as refused:
        decode_image(gif_with_a_frame_larger_than_its_screen(), max_pixels=100 * 100)
    assert refused.value.status == 413
    assert decode_image(gif_with_a_frame_larger_than_its_screen(), max_pixels=300 * 200).size == (300, 200)


class GrowingPng(PngImagePlugin.PngImageFile):
    """A plugin that only learns while decoding that the image is twice as large as its header said."""

    def load(self):
        pixels = super().load()
        self._size = (self.width * 2, self.height * 2)
        return pixels


def test_the_pixel_limit_is_checked_again_on_what_was_decoded(monkeypatch):
    from app.uploads import UploadError

    monkeypatch.setattr("app.uploads.open_accepted", lambda data: GrowingPng(io.BytesIO(data)))
    with pytest.raises(UploadError, match="80x60 pixels is over the limit"):
        decode_image(encoded(photo(40, 30), "PNG"), max_pixels=40 * 30)


def sixteen_bit_png(width: int, height: int) -> bytes:
    ramp = (np.arange(width * height, dtype=np.uint32) % 65536).astype(np.uint16).reshape(height, width)
    return encoded(Image.fromarray(ramp), "PNG", compress_level=1)


def rgba_png(width: int, height: int) -> bytes:
    return encoded(Image.new("RGBA", (width, height), (10, 200, 30, 128)), "PNG", compress_level=1)


# Decoding to RGB needs the decoded image (2 bytes a pixel for 16-bit, 4 for RGBA) and the RGB
# result (3); the bound leaves room for one 8-bit plane besides, not for a float or second copy.
@pytest.mark.parametrize("make,bytes_per_pixel", [(sixteen_bit_png, 8), (rgba_png, 9)], ids=["16-bit", "rgba"])
def test_decoding_large_images_stays_within_a_few_bytes_a_pixel(make, bytes_per_pixel):
    width, height = 3000, 2000
    data = make(width, height)
    image, growth = peak_growth(lambda: decode_image(data, max_pixels=40_000_000))
    assert image.mode == "RGB" and image.size == (width, height)
    assert growth < bytes_per_pixel * width * height, f"{growth / (width * height):.1f} bytes a pixel"


@pytest.mark.parametrize("data", [
    encoded(photo(64, 48), "JPEG"), encoded(photo(64, 48), "PNG"), encoded(photo(64, 48), "WEBP"),
    encoded(photo(64, 48).convert("P"), "GIF"), encoded(photo(64, 48), "BMP"), tiff_of(photo(64, 48)),
], ids=["jpeg", "png", "webp", "gif", "bmp", "tiff"])
def test_every_cut_of_an_accepted_file_is_a_4xx(client, data):
    for length in (4, 12, 40, len(data) // 3, len(data) // 2, len(data) - 9):
        response = post_file(client, data[:length], name="cut")
        # 200: the decoder fills in what is missing; 415: too short to tell the format
        assert response.status_code in (200, 400, 415), (length, response.status_code)


def test_the_header_is_judged_before_any_pixel_is_decoded(client):
    """8000x6000 is over the 40 M limit and under Pillow's own: only our header check stops it
    before decoding (its pixel data is missing, so a decode would end in a 400 instead)."""
    from tests.test_app import png_header_only

    response, growth = peak_growth(lambda: post_file(client, png_header_only(8000, 6000), name="big.png"))
    assert response.status_code == 413 and "8000x6000 pixels is over the limit" in response.get_json()["error"]
    assert growth < REFUSED_REQUEST_BOUND


def png_with_text_chunks(chunks: int, unpacked: int = 1 << 20) -> bytes:
    """A 1x1 PNG carrying ``chunks`` compressed text chunks of ``unpacked`` bytes each."""
    from tests.hostile_images import blank_png, png_chunk

    png = blank_png(1, 1)
    text = png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"a" * unpacked, 9))
    return png[:33] + text * chunks + png[33:]  # after the 33 bytes of signature and IHDR


def test_a_png_full_of_text_is_refused_without_unpacking_it(client):
    data = png_with_text_chunks(60)  # 60 MB of text in 60 KB: Pillow's default would unpack 64 MB
    response, growth = peak_growth(lambda: post_file(client, data, name="notes.png"))
    assert response.status_code == 400 and "corrupt or truncated" in response.get_json()["error"]
    assert growth < REFUSED_REQUEST_BOUND
    assert post_file(client, png_with_text_chunks(1, unpacked=1000), name="small-notes.png").status_code == 200


def test_a_float_tiff_with_nan_keeps_its_other_pixels():
    values = np.array([[np.nan, 0.0], [500.0, 1000.0]], dtype=np.float32)
    image = decode_image(encoded(Image.fromarray(values, mode="F"), "TIFF"), max_pixels=100)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], [[0, 0], [127, 255]])
