"""The Flask service through its test client: routes, the class-id PNG and RLE, bad input, token,
traversal, retention, and every response against the OpenAPI document."""
from __future__ import annotations

import io
import json
import os
import re
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flask import render_template
from jsonschema import Draft202012Validator, ValidationError
from openapi_spec_validator import validate as validate_openapi_document
from PIL import Image
from pycocotools import mask as coco_mask
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from app import create_app
from app.results import ResultFiles
from app.uploads import decode_image
from tests.tiny_checkpoint import CLASS_NAMES, make_checkpoint
from utils.classes import palette
from utils.inference.predictor import Predictor
from utils.inference.tiling import MODES, SCALE_RANGE, TTA_CHOICES, Strategy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", varied=True)


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


def test_image_url_follows_an_allowed_request_host(make_client):
    client = make_client(TRUSTED_HOSTS=["seg.example.org"])
    response = post_file(client, encoded(photo()), base_url="https://seg.example.org:8443")
    assert response.get_json()["image_url"].startswith("https://seg.example.org:8443/results/")


def test_raw_body_upload(client):
    response = client.post("/json", data=encoded(photo(), "PNG"), content_type="image/png")
    assert response.status_code == 200 and response.get_json()["width"] == 90


def local(url: str) -> str:
    return url.replace("http://localhost", "")


def segment(client, data: bytes, query: str = "") -> dict:
    response = post_file(client, data, url="/json" + query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def predicted_class_map(client, data: bytes) -> np.ndarray:
    """What the predictor itself makes of ``data``, decoded as the service decodes it."""
    return client.application.extensions["segmenter"].load().predict(decode_image(data, 10**8)).class_map


def test_mask_png_is_the_predictors_class_map_with_the_palette(client):
    data = encoded(photo(90, 70))
    body = segment(client, data)
    response = client.get(local(body["mask_url"]))
    assert response.status_code == 200 and response.mimetype == "image/png"
    png = Image.open(io.BytesIO(response.data))
    assert png.mode == "P" and png.size == (90, 70)
    class_ids = np.asarray(png)
    np.testing.assert_array_equal(class_ids, predicted_class_map(client, data))
    used = int(class_ids.max()) + 1
    assert png.getpalette()[:3 * used] == palette(used).ravel().tolist()
    areas = np.bincount(class_ids.ravel())
    assert len(body["classes"]) == 3  # the varied tiny model finds every class in noise
    assert {c["id"]: c["area"] for c in body["classes"]} == {i: int(a) for i, a in enumerate(areas) if a}


def test_wide_class_maps_are_stored_as_16_bit_ids(tmp_path):
    class_map = np.array([[0, 300], [65535, 7]], dtype=np.int32)  # models of more than 256 classes
    files = ResultFiles(tmp_path)
    files.save_mask(class_map)
    np.testing.assert_array_equal(np.asarray(Image.open(files.path("mask"))), class_map)


def test_rle_decodes_to_exactly_each_class_of_the_png(client):
    data = encoded(photo(90, 70))
    assert all("rle" not in entry for entry in segment(client, data)["classes"])
    body = segment(client, data, "?rle=1")
    class_ids = np.asarray(Image.open(io.BytesIO(client.get(local(body["mask_url"])).data)))
    assert {entry["id"] for entry in body["classes"]} == set(np.unique(class_ids).tolist())
    for entry in body["classes"]:
        assert entry["rle"]["size"] == [70, 90] and isinstance(entry["rle"]["counts"], str)
        np.testing.assert_array_equal(coco_mask.decode(entry["rle"]), (class_ids == entry["id"]).astype(np.uint8))


def test_min_area_ratio_leaves_out_smaller_classes_and_keeps_full_map_areas(client):
    data = encoded(photo(90, 70))
    everything = segment(client, data)["classes"]
    ratios = sorted(entry["area_ratio"] for entry in everything)
    assert len(set(ratios)) == 3
    threshold = (ratios[0] + ratios[1]) / 2
    filtered = segment(client, data, f"?min_area_ratio={threshold}&rle=1")["classes"]
    assert [{k: v for k, v in entry.items() if k != "rle"} for entry in filtered] == everything[:2]
    assert segment(client, data, f"?min_area_ratio={ratios[1]}")["classes"] == everything[:2]  # at the share: kept
    assert segment(client, data, "?min_area_ratio=1")["classes"] == []
    assert segment(client, data, "?min_area_ratio=0")["classes"] == everything


@pytest.mark.parametrize("query,message", [
    ("min_area_ratio=abc", "min_area_ratio must be a number from 0 to 1, not 'abc'"),
    ("min_area_ratio=-0.1", "min_area_ratio must be a number"),
    ("min_area_ratio=1.5", "min_area_ratio must be a number"),
    ("min_area_ratio=nan", "min_area_ratio must be a number"),
    ("min_area_ratio=", "min_area_ratio must be a number"),
    ("rle=2", "rle must be 0 or 1, not '2'"),
    ("rle=true", "rle must be 0 or 1"),
    ("mode=tiles", "mode must be one of whole, slide, not 'tiles'"),
    ("tta=rotate", "tta must be one of none, flip, scales, flip+scales, not 'rotate'"),
    ("mode=slide&scale=abc", "query parameter scale must be a number, not 'abc'"),
    ("mode=slide&scale=0", "query parameter scale must be within 0.05..4.0, not 0.0"),
    ("scale=0.5", "query parameter scale: only in slide mode"),
], ids=["text", "negative", "above-1", "nan", "empty", "rle-2", "rle-true", "mode", "tta", "scale-text", "scale-0",
        "scale-whole"])
def test_bad_query_values_are_400s_before_the_upload_is_read(client, tmp_path, query, message):
    response = client.post("/json?" + query, data=b"not even an image", content_type="application/octet-stream")
    assert response.status_code == 400 and message in response.get_json()["error"]
    assert not list((tmp_path / "results").iterdir())


def test_slide_and_tta_answer_what_the_predictor_sees_that_way(client, checkpoint):
    image = photo(150, 110)
    expected = Predictor.from_checkpoint(checkpoint, device="cpu").predict(image, Strategy(mode="slide", tta="flip"))
    body = segment(client, encoded(image, "PNG"), "?mode=slide&tta=flip")
    areas = {entry["id"]: entry["area"] for entry in body["classes"]}
    ids, counts = np.unique(expected.class_map, return_counts=True)
    assert areas == dict(zip(ids.tolist(), counts.tolist(), strict=True))
    assert areas != {entry["id"]: entry["area"] for entry in segment(client, encoded(image, "PNG"))["classes"]}


def test_a_request_needing_more_passes_than_allowed_is_a_413(make_client, tmp_path):
    client = make_client(MAX_FORWARDS=5)
    assert segment(client, encoded(photo(90, 70)), "?tta=flip")["classes"]  # 2 passes
    response = post_file(client, encoded(photo(90, 70)), url="/json?tta=flip+scales")  # 6: "+" unencoded too
    assert response.status_code == 413
    assert "needs 6 network passes; this service allows 5" in response.get_json()["error"]


def test_the_openapi_document_offers_exactly_the_strategies_the_predictor_has(client):
    parameters = {entry["name"]: entry["schema"] for entry in
                  client.get("/openapi.json").get_json()["paths"]["/json"]["post"]["parameters"]}
    assert parameters["mode"]["enum"] == list(MODES) and parameters["tta"]["enum"] == list(TTA_CHOICES)
    assert (parameters["scale"]["minimum"], parameters["scale"]["maximum"]) == SCALE_RANGE


def test_results_serve_each_kind_with_its_type(client):
    response = post_file(client, encoded(photo(90, 70)), url="/json?rle=1")
    body = response.get_json()
    kinds = {"image_url": "image/jpeg", "mask_url": "image/png", "json_url": "application/json"}
    ids = set()
    for key, mimetype in kinds.items():
        served = client.get(local(body[key]))
        assert served.status_code == 200 and served.mimetype == mimetype
        assert served.headers["X-Content-Type-Options"] == "nosniff"
        ids.add(body[key].rsplit("/", 1)[1].split(".")[0])
    assert len(ids) == 1  # one result, one random id
    assert client.get(local(body["json_url"])).data == response.data  # the stored answer is the answer


def test_page_keeps_the_photo_and_links_every_download(client):
    data = encoded(photo(90, 70))
    html = post_file(client, data, url="/").data.decode()
    links = {name: re.search(rf'id="{name}" href="([^"]+)"', html)[1]
             for name in ("download-overlay", "download-mask", "download-json")}
    photo_url = re.search(r'id="photo" src="([^"]+)"', html)[1]
    stored = Image.open(io.BytesIO(client.get(local(photo_url)).data))
    assert stored.format == "JPEG" and stored.size == (90, 70)
    assert client.get(local(links["download-overlay"])).mimetype == "image/jpeg"
    class_ids = np.asarray(Image.open(io.BytesIO(client.get(local(links["download-mask"])).data)))
    np.testing.assert_array_equal(class_ids, predicted_class_map(client, data))
    answer = client.get(local(links["download-json"])).get_json()
    assert links["download-mask"].startswith("/results/")  # relative: right behind any proxy
    assert answer["mask_url"] == "http://localhost" + links["download-mask"] and len(answer["classes"]) == 3
    rows = re.findall(r'<tr data-class-id="(\d+)" data-colour="(#[0-9a-f]{6})">', html)
    colours = palette(len(CLASS_NAMES))
    assert [(int(i), c) for i, c in rows] == [(e["id"], "#" + bytes(colours[e["id"]]).hex()) for e in answer["classes"]]


def test_page_shows_result_and_escapes_class_names(client):
    assert b'type="file"' in client.get("/").data
    assert b'action="/json"' in client.get("/json").data
    response = post_file(client, encoded(photo()), url="/")
    assert response.status_code == 200
    html = response.data.decode()
    assert 'id="result-image"' in html and "/results/" in html


def test_legend_escapes_class_names(client):
    # Rendered directly: the tiny model need not predict the class whose name is markup.
    row = {"id": 2, "colour": "#ff0000", "name": "<b>tag</b>", "area_ratio": 0.5, "mean_confidence": 0.9}
    result = SimpleNamespace(width=4, height=3, inference_ms=1.0)
    urls = {f"{kind}_url": f"/results/x.{kind}" for kind in ("image", "photo", "mask", "json")}
    with client.application.test_request_context("/"):
        html = render_template("index.html", action="/", result=result, legend=[row], **urls)
    assert "&lt;b&gt;tag&lt;/b&gt;" in html and "<b>tag</b>" not in html


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``x``height`` but carries almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))


@pytest.mark.parametrize("data,name,status,message", [
    (b"hello, this is text", "notes.txt", 415, "not an image"),
    (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "doc.pdf", 415, "not an image"),
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
    assert response.status_code == 415
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


def test_retention_keeps_count_and_age_of_whole_results(make_client, tmp_path):
    client = make_client(RESULTS_KEEP=3, RESULTS_PRUNE_INTERVAL_S=0)  # prunes after every result
    folder = tmp_path / "results"
    for _ in range(4):
        assert post_file(client, encoded(photo())).status_code == 200
    assert post_file(client, encoded(photo()), url="/").status_code == 200  # the page also keeps the photo
    assert sorted(path.name[22:] for path in folder.iterdir()) == sorted([".jpg", ".png", ".json"] * 3 + [".photo.jpg"])
    old = [folder / ("oldoldoldoldoldoldoldo" + suffix) for suffix in (".jpg", ".photo.jpg", ".png", ".json")]
    for path in old:
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 10 * 24 * 3600,) * 2)
    other = folder / "notes.txt"  # not a result name: never touched
    other.write_text("x")
    orphan = folder / "orphanorphanorphanorph.png"  # its overlay already pruned: recent, but goes too
    orphan.write_bytes(b"x")
    post_file(client, encoded(photo()))
    assert not any(path.exists() for path in old + [orphan]) and other.exists()
    assert len(list(folder.glob("*.png"))) == len(list(folder.glob("*.json"))) == 3
    assert not list(folder.glob(".*.tmp"))


def test_results_are_pruned_at_most_once_an_interval(make_client, tmp_path):
    client = make_client(RESULTS_KEEP=1, RESULTS_PRUNE_INTERVAL_S=1)
    clock = [1000.0]
    client.application.extensions["prune_schedule"].clock = lambda: clock[0]
    folder = tmp_path / "results"
    for _ in range(3):
        assert post_file(client, encoded(photo())).status_code == 200
    assert len(list(folder.glob("*.json"))) == 3  # the first pruned (sparing its own); the next two were not due
    clock[0] += 1
    assert post_file(client, encoded(photo())).status_code == 200
    assert len(list(folder.glob("*.json"))) == 1


def test_health_readiness_and_model_info(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 503  # loaded lazily in tests; gunicorn loads at worker start
    info = client.get("/api/model").get_json()
    assert info["architecture"] == "unet" and info["classes"] == CLASS_NAMES
    assert info["input_size"] == [64, 64] and info["device"] == "cpu" and info["metrics"] == {"miou": 0.5}
    assert client.get("/readyz").status_code == 200


def test_internal_errors_are_short_500s(client, monkeypatch):
    segmenter = client.application.extensions["segmenter"]
    monkeypatch.setattr(segmenter, "segment", lambda image, strategy: 1 / 0)
    response = post_file(client, encoded(photo()))
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error: the request could not be processed",
                                   "request_id": response.headers["X-Request-ID"]}


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


OPENAPI_URI = "urn:openapi"


def strict(node: object) -> object:
    """The OpenAPI document for checking: references made absolute (so any part can be a schema of
    its own) and every described object closed, so that an undocumented field fails the check."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    copied = {key: strict(value) for key, value in node.items()}
    if isinstance(copied.get("$ref"), str) and copied["$ref"].startswith("#"):
        copied["$ref"] = OPENAPI_URI + copied["$ref"]
    if isinstance(copied.get("properties"), dict) and copied.get("type") == "object":
        copied.setdefault("additionalProperties", False)
    return copied


def described_response(document: dict, path: str, method: str, status: int) -> dict:
    described = document["paths"][path][method]["responses"][str(status)]  # KeyError: status undocumented
    if "$ref" in described:
        described = document["components"]["responses"][described["$ref"].rsplit("/", 1)[1]]
    return described


def check_against_openapi(document: dict, path: str, method: str, response) -> None:
    """``response`` has a status and media type the document gives for ``method path``, and its
    JSON body fits the schema given for them."""
    content = described_response(document, path, method, response.status_code)["content"]
    assert response.mimetype in content, f"{method} {path} {response.status_code}: {response.mimetype}"
    if response.mimetype == "application/json":
        checked = strict(document)
        registry = Registry().with_resource(OPENAPI_URI, DRAFT202012.create_resource(checked))
        schema = strict(content["application/json"]["schema"])
        Draft202012Validator(schema, registry=registry).validate(response.get_json())


def test_responses_match_the_openapi_document(make_client, monkeypatch):
    client = make_client(API_TOKEN="s3cret", MAX_CONTENT_LENGTH=5000)
    document = client.get("/openapi.json").get_json()
    validate_openapi_document(document)
    token = {"Authorization": "Bearer s3cret"}
    small = encoded(photo(40, 30))
    exchanges = [("/readyz", "get", client.get("/readyz"))]  # 503: not loaded yet
    for query in ("", "?rle=1", "?min_area_ratio=0.2&rle=1"):
        exchanges.append(("/json", "post", post_file(client, small, url="/json" + query, headers=token)))
    body = exchanges[-1][2].get_json()
    assert body["classes"] and all("rle" in entry for entry in body["classes"])
    exchanges += [("/results/{name}", "get", client.get(local(body[key])))
                  for key in ("image_url", "mask_url", "json_url")]
    exchanges += [
        ("/results/{name}", "get", client.get("/results/AAAAAAAAAAAAAAAAAAAAAA.png", headers=token)),
        ("/results/{name}", "get", client.get(local(body["mask_url"]).split("?")[0])),  # 401: no token, no signature
        ("/json", "post", post_file(client, encoded(photo(40, 30), "PPM"), headers=token)),  # 415
        ("/json", "post", client.post("/json?rle=2", data=small, headers=token)),
        ("/json", "post", post_file(client, b"text", headers=token)),
        ("/json", "post", post_file(client, small)),
        ("/json", "post", post_file(client, encoded(photo(200, 200), "PNG"), headers=token)),
        ("/healthz", "get", client.get("/healthz")),
        ("/readyz", "get", client.get("/readyz")),
        ("/api/model", "get", client.get("/api/model", headers=token)),
        ("/api/model", "get", client.get("/api/model")),
        ("/openapi.json", "get", client.get("/openapi.json")),
        ("/metrics", "get", client.get("/metrics", headers=token)),
        ("/metrics", "get", client.get("/metrics")),
    ]
    monkeypatch.setattr("app.results.free_bytes", lambda folder: 0)
    exchanges.append(("/json", "post", post_file(client, small, headers=token)))  # 507
    monkeypatch.setattr(client.application.extensions["segmenter"], "segment", lambda image, strategy: 1 / 0)
    monkeypatch.setattr("app.results.free_bytes", lambda folder: 10**12)
    exchanges.append(("/json", "post", post_file(client, small, headers=token)))
    statuses = {(path, method, response.status_code) for path, method, response in exchanges}
    assert {s for _, _, s in statuses} == {200, 400, 401, 404, 413, 415, 500, 503, 507}
    for path, method, response in exchanges:
        check_against_openapi(document, path, method, response)
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert described == {(path, method) for path, method, _ in statuses}  # every operation exercised


def test_the_openapi_check_catches_undocumented_fields(client):
    document = client.get("/openapi.json").get_json()
    response = post_file(client, encoded(photo(40, 30)))
    response.set_data(json.dumps(dict(response.get_json(), extra=1)))
    with pytest.raises(ValidationError, match="extra"):
        check_against_openapi(document, "/json", "post", response)
