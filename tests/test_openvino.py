"""The OpenVINO backend: torch fp32's answers at any size, and a cached IR that is only ever the
checkpoint's own."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from tests.conftest import ROOT
from tests.test_app import encoded, photo, post_file
from tests.test_predictor import noise_image
from tests.test_serving import free_port, jpeg, wait_until_ready
from tests.tiny_checkpoint import make_checkpoint
from utils.fileio import file_sha256
from utils.inference import openvino_runtime
from utils.inference.predictor import Predictor, choose_backend

pytest.importorskip("openvino", reason="the backend needs OpenVINO (requirements.txt)")

# fp32 on both sides, in other kernel orders: the default model's confidences differ by 3e-6 at most
# (three 640x480 photos).  A confidence within this of torch's also bounds every class-map
# difference to a tie: a pixel whose classes differed by more would differ by that in confidence.
CONFIDENCE_TOLERANCE = 1e-4


def ir_files(checkpoint: Path) -> list[str]:
    return sorted(path.name for path in checkpoint.with_name(checkpoint.name + ".openvino").iterdir())


def assert_same_answers(reference: Predictor, candidate: Predictor, width: int, height: int) -> None:
    image = noise_image(width, height, seed=width * height)
    expected, actual = reference.predict(image), candidate.predict(image)
    assert actual.class_map.shape == (height, width)
    np.testing.assert_allclose(actual.confidence, expected.confidence, atol=CONFIDENCE_TOLERANCE)
    assert (actual.class_map == expected.class_map).mean() > 0.999


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("openvino") / "tiny.pth", varied=True)


@pytest.fixture(scope="module")
def torch_fp32(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")


@pytest.mark.parametrize("width, height", [(97, 131), (1, 600), (640, 480), (131, 97)])
def test_openvino_answers_as_torch_fp32_at_any_size(checkpoint, torch_fp32, width, height):
    openvino = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    assert openvino.precision == "fp32"
    assert_same_answers(torch_fp32, openvino, width, height)


def test_the_ir_is_named_by_the_checkpoint_and_reused(checkpoint, monkeypatch):
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    stem = (f"{file_sha256(checkpoint)}-{openvino_runtime.openvino().get_version().split('-')[0]}"
            f"-{openvino_runtime.OUTPUT_LAYOUT}")
    assert ir_files(checkpoint) == [f"{stem}.bin", f"{stem}.json", f"{stem}.xml"]

    def never(model):
        raise AssertionError("converted again although the cache holds this checkpoint's IR")
    monkeypatch.setattr(openvino_runtime, "convert", never)
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")


@pytest.mark.parametrize("broken", ["xml", "bin", "json"])
def test_a_corrupt_cache_is_rebuilt_with_a_log_line(tmp_path, broken, caplog):
    checkpoint = make_checkpoint(tmp_path / "tiny.pth", varied=True)
    reference = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    (victim,) = checkpoint.with_name("tiny.pth.openvino").glob(f"*.{broken}")
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    with caplog.at_level(logging.WARNING, logger=openvino_runtime.__name__):
        rebuilt = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    assert "rebuilding the OpenVINO cache" in caplog.text
    assert_same_answers(reference, rebuilt, 97, 131)
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")  # the rebuilt cache reads


def test_a_checkpoint_replaced_at_the_same_path_gets_its_own_ir(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "tiny.pth")
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    old = ir_files(checkpoint)
    make_checkpoint(checkpoint, varied=True)  # other weights, same path
    reference = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    assert_same_answers(reference, Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino"), 97, 131)
    assert not set(old) & set(ir_files(checkpoint))  # the old IR is gone, never served


def test_an_unwritable_cache_converts_in_memory(tmp_path, monkeypatch, caplog):
    checkpoint = make_checkpoint(tmp_path / "tiny.pth", varied=True)

    def read_only(*args):
        raise PermissionError("read-only file system")
    monkeypatch.setattr(openvino_runtime, "write_cache", read_only)
    with caplog.at_level(logging.WARNING, logger=openvino_runtime.__name__):
        served = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    assert "not cached" in caplog.text
    assert_same_answers(Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32"), served, 64, 48)


def test_reduced_precisions_wait_for_a_guard_of_their_own(checkpoint):
    with pytest.raises(ValueError, match="fp32 only"):
        Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino", precision="bf16")


def test_the_service_runs_on_openvino_and_says_so(make_client):
    client = make_client(BACKEND="openvino")
    described = client.get("/api/model").get_json()
    assert (described["backend"], described["precision"]) == ("openvino", "fp32")
    answer = post_file(client, encoded(photo()))
    assert answer.status_code == 200 and answer.get_json()["classes"]


def test_sizes_beyond_the_kept_graphs_are_compiled_again_and_still_right(checkpoint, torch_fp32, monkeypatch):
    monkeypatch.setattr(openvino_runtime, "STATIC_SIZES_KEPT", 1)
    openvino = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    for width, height in ((97, 131), (131, 97), (97, 131)):
        assert_same_answers(torch_fp32, openvino, width, height)


def test_gunicorn_workers_serve_on_openvino(tmp_path):
    """Two workers, each compiling its own graphs after the fork."""
    port = free_port()
    environment = dict(os.environ, SEG_CHECKPOINT=str(make_checkpoint(tmp_path / "tiny.pth", varied=True)),
                       SEG_RESULTS_DIR=str(tmp_path / "results"), SEG_BIND=f"127.0.0.1:{port}",
                       SEG_WORKERS="2", SEG_THREADS="1", SEG_BACKEND="openvino")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "app:create_app()"],
                               cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)

        def one(n: int) -> tuple[int, int]:
            width, height = 60 + n, 40 + 2 * n
            response = requests.post(url + "/json", files={"file": ("p.jpg", jpeg(width, height, n))}, timeout=60)
            return response.status_code, sum(c["area"] for c in response.json()["classes"]) - width * height

        with ThreadPoolExecutor(max_workers=4) as pool:
            assert list(pool.map(one, range(8))) == [(200, 0)] * 8
        described = requests.get(url + "/api/model", timeout=30).json()
        assert (described["backend"], described["precision"]) == ("openvino", "fp32")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_auto_is_openvino_on_the_cpu_and_torch_elsewhere(monkeypatch, caplog):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", cpu, compiled=False) == "openvino"
    assert choose_backend("auto", gpu, compiled=False) == "torch"
    assert choose_backend("auto", cpu, compiled=True) == "torch"
    assert choose_backend("onnxruntime", cpu, compiled=False) == "onnxruntime"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert choose_backend("auto", cpu, compiled=False) == "torch"
    assert "OpenVINO is not installed" in caplog.text


def test_the_service_default_is_auto(monkeypatch):
    from app import settings

    monkeypatch.delenv("SEG_BACKEND")
    assert settings.from_environment()["BACKEND"] == "auto"
