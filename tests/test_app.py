"""The Flask service through its test client: routes, bad input, token, traversal, retention."""
from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flask import render_template
from PIL import Image

from app import create_app
from tests.tiny_checkpoint import CLASS_NAMES, make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture()
def make_client(checkpoint, tmp_path):
    def make(**config):
        app = create_app({"CHECKPOINT": str(checkpoint), "RESULTS_DIR": str(tmp_path / "results"),
                          "TESTING": True, **config})
        return app.test_client()
    return make


@pytest.fixture()
def client(make_client):
    return make_client()


def encoded(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def photo(width: int = 90, height: int = 70, mode: str = "RGB") -> Image.Image:
    array = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def post_file(client, data: bytes, url: str = "/json", name: str = "photo.jpg", **kwargs):
    return client.post(url, data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data", **kwargs)


def test_json_shape_and_areas(client):
    response = post_file(client, encoded(photo(90, 70)))
    assert response.status_code == 200
    body = response.get_json()
    assert (body["width"], body["height"]) == (90, 70)
    assert sum(c["area"] for c in body["classes"]) == 90 * 70
    assert sum(c["area_ratio"] for c in body["classes"]) == pytest.approx(1.0)
    areas = [c["area"] for c in body["classes"]]
    assert areas == sorted(areas, reverse=True)
    for entry in body["classes"]:
        assert entry["name"] == CLASS_NAMES[entry["id"]] and 0 < entry["mean_confidence"] <= 1
    assert body["model"] == {"architecture": "unet", "checkpoint": "tiny.pth"}
    assert body["image_url"].startswith("http://localhost/results/") and body["inference_ms"] > 0
    image = client.get(body["image_url"].replace("http://localhost", ""))
    assert image.status_code == 200 and image.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(image.data)).size == (90, 70)


def test_image_url_follows_the_request_host(client):
    response = post_file(client, encoded(photo()), base_url="https://seg.example.org:8443")
    assert response.get_json()["image_url"].startswith("https://seg.example.org:8443/results/")


def test_raw_body_upload(client):
    response = client.post("/json", data=encoded(photo(), "PNG"), content_type="image/png")
    assert response.status_code == 200 and response.get_json()["width"] == 90


def test_page_shows_result_and_escapes_class_names(client):
    assert b'type="file"' in client.get("/").data
    assert b'action="/json"' in client.get("/json").data
    response = post_file(client, encoded(photo()), url="/")
    assert response.status_code == 200
    html = response.data.decode()
    assert 'id="result-image"' in html and "/results/" in html


def test_legend_escapes_class_names(client):
    # Rendered directly: the tiny model need not predict the class whose name is markup.
    row = {"colour": "#ff0000", "name": "<b>tag</b>", "area_ratio": 0.5, "mean_confidence": 0.9}
    result = SimpleNamespace(width=4, height=3, inference_ms=1.0)
    with client.application.test_request_context("/"):
        html = render_template("index.html", action="/", result=result, image_url="/results/x.jpg", legend=[row])
    assert "&lt;b&gt;tag&lt;/b&gt;" in html and "<b>tag</b>" not in html


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``x``height`` but carries almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))


@pytest.mark.parametrize("data,name,status,message", [
    (b"hello, this is text", "notes.txt", 400, "not an image"),
    (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "doc.pdf", 400, "not an image"),
    (encoded(photo(200, 200))[:600], "cut.jpg", 400, "corrupt or truncated"),
    (encoded(photo(200, 200), "PNG")[:300], "cut.png", 400, "corrupt or truncated"),
    (png_header_only(30000, 30000), "bomb.png", 413, "too large"),
], ids=["text", "pdf", "truncated-jpeg", "truncated-png", "bomb"])
def test_bad_images_get_clear_json_errors(client, data, name, status, message):
    response = post_file(client, data, name=name)
    assert response.status_code == status
    assert message in response.get_json()["error"]
    assert "Traceback" not in response.data.decode()


def test_missing_field_and_empty_body(client):
    response = client.post("/json", data={"other": "x"}, content_type="multipart/form-data")
    assert response.status_code == 400 and "no file" in response.get_json()["error"]
    response = client.post("/json", data=b"", content_type="application/octet-stream")
    assert response.status_code == 400 and "empty" in response.get_json()["error"]
    response = post_file(client, b"", name="empty.jpg")
    assert response.status_code == 400 and "empty" in response.get_json()["error"]


def test_limits(make_client):
    client = make_client(MAX_CONTENT_LENGTH=2000, MAX_PIXELS=100 * 100)
    response = post_file(client, encoded(photo(300, 300), "PNG"))
    assert response.status_code == 413 and "upload too large" in response.get_json()["error"]
    response = post_file(client, encoded(Image.new("RGB", (120, 110), "teal")))
    assert response.status_code == 413 and "over the limit" in response.get_json()["error"]
    assert post_file(client, encoded(Image.new("RGB", (100, 90), "teal"))).status_code == 200


def sixteen_bit_png() -> bytes:
    return encoded(Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50), "PNG")


def animated_gif() -> bytes:
    frames = [photo(40, 30).convert("P"), photo(40, 30).convert("P").rotate(90)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.mark.parametrize("data,size", [
    (sixteen_bit_png(), (40, 30)),
    (encoded(photo(50, 40, "P"), "PNG"), (50, 40)),
    (encoded(photo(50, 40, "RGBA"), "PNG"), (50, 40)),
    (encoded(photo(50, 40, "CMYK"), "JPEG"), (50, 40)),
    (encoded(photo(50, 40, "L"), "JPEG"), (50, 40)),
    (encoded(photo(1, 1), "PNG"), (1, 1)),
    (animated_gif(), (40, 30)),
    (encoded(photo(50, 40), "WEBP"), (50, 40)),
], ids=["16-bit", "palette", "alpha", "cmyk", "gray", "1x1", "gif", "webp"])
def test_unusual_images_are_converted_not_rejected(client, data, size):
    response = post_file(client, data, name="image")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["width"], body["height"]) == size
    assert sum(c["area"] for c in body["classes"]) == size[0] * size[1]


def test_page_shows_readable_errors(client):
    response = post_file(client, b"plain text", url="/", name="a.txt")
    assert response.status_code == 400
    html = response.data.decode()
    assert 'id="error"' in html and "not an image" in html and "Traceback" not in html


def test_token_rule(make_client):
    client = make_client(API_TOKEN="s3cret")
    data = encoded(photo())
    assert post_file(client, data).status_code == 401
    assert post_file(client, data, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post_file(client, data, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert post_file(client, data, url="/").status_code == 401
    public = make_client(API_TOKEN="s3cret", PAGE_PUBLIC=True)
    assert post_file(public, data, url="/").status_code == 200
    assert post_file(public, data).status_code == 401


@pytest.mark.parametrize("path", [
    "/results/../app/__init__.py", "/results/..%2F..%2Fapp%2F__init__.py", "/results/%2e%2e%2fREADME.md",
    "/results/AAAAAAAAAAAAAAAAAAAAAA.jpg", "/results/.hidden.jpg", "/results/x.png",
])
def test_results_never_serve_anything_else(client, tmp_path, path):
    # Files that exist in the results folder but are not result names must stay hidden too.
    folder = tmp_path / "results"
    folder.mkdir(exist_ok=True)
    for name in (".hidden.jpg", "x.png"):
        (folder / name).write_bytes(encoded(photo()))
    assert client.get(path).status_code == 404


def test_retention_keeps_count_and_age(make_client, tmp_path):
    client = make_client(RESULTS_KEEP=3)
    folder = tmp_path / "results"
    old = folder / "oldoldoldoldoldoldoldo.jpg"
    for _ in range(5):
        assert post_file(client, encoded(photo())).status_code == 200
    assert len(list(folder.glob("*.jpg"))) == 3
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 10 * 24 * 3600,) * 2)
    post_file(client, encoded(photo()))
    assert not old.exists() and len(list(folder.glob("*.jpg"))) == 3
    assert not list(folder.glob(".*.tmp"))


def test_health_readiness_and_model_info(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 503  # loaded lazily in tests; gunicorn loads at worker start
    info = client.get("/api/model").get_json()
    assert info["architecture"] == "unet" and info["classes"] == CLASS_NAMES
    assert info["input_size"] == [64, 64] and info["device"] == "cpu" and info["metrics"] == {"miou": 0.5}
    assert client.get("/readyz").status_code == 200


def test_internal_errors_are_short_500s(client, monkeypatch):
    segmenter = client.application.extensions["segmenter"]
    monkeypatch.setattr(segmenter, "segment", lambda image: 1 / 0)
    response = post_file(client, encoded(photo()))
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error: the request could not be processed"}


def test_unknown_routes_and_methods_answer_in_kind(client):
    assert client.get("/nope").status_code == 404
    response = client.get("/api/nothing")
    assert response.status_code == 404 and "error" in response.get_json()
    assert client.delete("/json").status_code == 405


def test_a_binary_flood_checkpoint_is_served_with_its_own_class_names(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "flood.pth", class_names=["background", "flood"])
    client = create_app({"CHECKPOINT": str(checkpoint), "RESULTS_DIR": str(tmp_path / "r")}).test_client()
    body = post_file(client, encoded(photo(80, 60))).get_json()
    assert {c["name"] for c in body["classes"]} <= {"background", "flood"} and body["classes"]
    assert client.get("/api/model").get_json()["classes"] == ["background", "flood"]
