"""The OpenVINO backend: torch fp32's answers at any size, and a cached IR that is only ever the
checkpoint's own."""
from __future__ import annotations

import logging
import multiprocessing.process
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import requires
from tests.servers import gunicorn, jpeg
from tests.test_app import encoded, photo, post_file
from tests.test_predictor import noise_image
from tests.tiny_checkpoint import make_checkpoint
from utils.fileio import file_sha256
from utils.inference import openvino_runtime
from utils.inference import predictor as predictor_module
from utils.inference.precision_guard import write_guard
from utils.inference.predictor import Predictor

pytestmark = requires("openvino", reason="the backend needs OpenVINO (requirements.txt)")

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
    paths = openvino_runtime.cache_paths(checkpoint, file_sha256(checkpoint), openvino_runtime.openvino().get_version())
    assert paths["xml"].name.startswith(file_sha256(checkpoint))
    assert ir_files(checkpoint) == sorted(path.name for path in paths.values())

    def never(model):
        raise AssertionError("converted again although the cache holds this checkpoint's IR")
    monkeypatch.setattr(openvino_runtime, "convert", never)
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")


def test_a_conversion_sends_no_telemetry(tmp_path, monkeypatch):
    """OpenVINO posts usage telemetry from a process it starts for each event unless told not to;
    the tests never use the network (tests/conftest.py turns it off)."""
    started = []
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", lambda process: started.append(process))
    Predictor.from_checkpoint(make_checkpoint(tmp_path / "tiny.pth"), device="cpu", backend="openvino")
    assert ir_files(tmp_path / "tiny.pth") and not started


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_a_bit(data: bytes) -> bytes:
    """The same size, one weight's bit flipped: what read_model alone would not notice."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1:]


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> Path:
    """A folder with a checkpoint and its OpenVINO cache, converted once for the tests that damage
    a copy of it."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("cached") / "tiny.pth", varied=True)
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    return checkpoint.parent


@pytest.mark.parametrize("broken, damage", [("xml", truncate), ("bin", truncate), ("json", truncate),
                                            ("bin", flip_a_bit)])
def test_a_corrupt_cache_is_rebuilt_with_a_log_line(cached, tmp_path, broken, damage, caplog):
    shutil.copytree(cached, tmp_path / "copy")
    checkpoint = tmp_path / "copy" / "tiny.pth"
    reference = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    (victim,) = checkpoint.with_name("tiny.pth.openvino").glob(f"*.{broken}")
    victim.write_bytes(damage(victim.read_bytes()))
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

    def disk_full(*args, **kwargs):
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp: No space left on device")
    monkeypatch.setattr(openvino_runtime.openvino(), "save_model", disk_full)
    with caplog.at_level(logging.WARNING, logger=openvino_runtime.__name__):
        served = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    assert "not cached" in caplog.text
    assert_same_answers(Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32"), served, 64, 48)


def test_openvino_runs_bf16_only_where_native_and_asked_for_or_guarded(tmp_path, checkpoint, monkeypatch, caplog):
    copy = tmp_path / "tiny.pth"
    copy.write_bytes(checkpoint.read_bytes())
    monkeypatch.setattr(openvino_runtime, "cpu_supports_bf16", lambda: False)  # as on an AVX2-only CPU
    with caplog.at_level(logging.WARNING):
        assert Predictor.from_checkpoint(copy, device="cpu", backend="openvino", precision="bf16").precision == "fp32"
    assert "this CPU has no native bf16: running fp32" in caplog.text
    with pytest.raises(ValueError, match="fp16 runs on CUDA only"):
        Predictor.from_checkpoint(copy, device="cpu", backend="openvino", precision="fp16")

    monkeypatch.setattr(openvino_runtime, "cpu_supports_bf16", lambda: True)
    assert Predictor.from_checkpoint(copy, device="cpu", backend="openvino").precision == "fp32"  # no verdict
    assert Predictor.from_checkpoint(copy, device="cpu", backend="openvino", precision="bf16").precision == "bf16"
    write_guard(copy, {"agreement": 1.0, "worst_image_agreement": 1.0, "miou_drop_points": 0.0}, "openvino", "bf16")
    served = Predictor.from_checkpoint(copy, device="cpu", backend="auto")
    assert (served.backend, served.precision) == ("openvino", "bf16")


def test_each_process_compiles_for_its_threads_unpinned_in_the_precision_it_says(checkpoint, monkeypatch):
    """Pinned, OpenVINO put gunicorn's one-thread workers on shared cores (bench/serve.py)."""
    configs = []
    compile_model = openvino_runtime.openvino().Core.compile_model
    monkeypatch.setattr(openvino_runtime.openvino().Core, "compile_model",
                        lambda self, model, device, config: configs.append(config) or compile_model(self, model, device,
                                                                                                   config))
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino", threads=1)
    assert configs and all(config["ENABLE_CPU_PINNING"] is False and config["INFERENCE_NUM_THREADS"] == 1
                           and config["INFERENCE_PRECISION_HINT"] == "f32" for config in configs)


def test_the_service_runs_on_openvino_and_says_so(make_client):
    client = make_client(BACKEND="openvino")
    described = client.get("/api/model").get_json()
    assert (described["backend"], described["precision"]) == ("openvino", "fp32")
    answer = post_file(client, encoded(photo()))
    assert answer.status_code == 200 and answer.get_json()["classes"]


def test_a_size_that_comes_back_gets_its_own_graph_and_few_are_kept(checkpoint, torch_fp32, monkeypatch):
    monkeypatch.setattr(openvino_runtime, "STATIC_SIZES_KEPT", 1)
    openvino = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")
    core = type(openvino_runtime.openvino().Core())
    compiled = []
    compile_model = core.compile_model
    monkeypatch.setattr(core, "compile_model", lambda self, *args: compiled.append(1) or compile_model(self, *args))
    for width, height in ((97, 131), (97, 131), (97, 131), (131, 97), (131, 97), (97, 131), (97, 131)):
        assert_same_answers(torch_fp32, openvino, width, height)
    # 97x131 compiled on its second visit; 131x97 on its second, evicting it; so 97x131 once more.
    assert len(compiled) == 3


def test_gunicorn_workers_serve_on_openvino(tmp_path):
    """Two workers, each compiling its own graphs after the fork."""
    with gunicorn(tmp_path, SEG_BACKEND="openvino") as (url, process):
        def one(n: int) -> tuple[int, int]:
            width, height = 60 + n, 40 + 2 * n
            response = requests.post(url + "/json", files={"file": ("p.jpg", jpeg(width, height, n))}, timeout=60)
            return response.status_code, sum(c["area"] for c in response.json()["classes"]) - width * height

        with ThreadPoolExecutor(max_workers=4) as pool:
            assert list(pool.map(one, range(8))) == [(200, 0)] * 8
        described = requests.get(url + "/api/model", timeout=30).json()
        assert (described["backend"], described["precision"]) == ("openvino", "fp32")
    log = process.stderr.read()
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 300):][:4000]
    # Two workers converted at once; whatever they left reads back as this checkpoint's, untouched.
    checkpoint = tmp_path / "tiny.pth"
    paths = openvino_runtime.cache_paths(checkpoint, file_sha256(checkpoint), openvino_runtime.openvino().get_version())
    assert openvino_runtime.read_cached(paths, file_sha256(checkpoint)) is not None


def test_auto_is_openvino_where_the_cpu_runs_fp32_and_torch_otherwise(checkpoint, monkeypatch, caplog):
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").backend == "openvino"
    # A precision the guard passed runs on torch: OpenVINO offers fp32 only.
    monkeypatch.setattr(predictor_module, "choose_precision", lambda *args: "bf16")
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").backend == "torch"
    monkeypatch.undo()

    def cannot(*args):
        raise RuntimeError("Check 'x' failed at src/frontends/pytorch: conversion of aten::foo\nand more")
    monkeypatch.setattr(predictor_module, "OpenVINOForward", cannot)
    with caplog.at_level(logging.WARNING):
        served = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", precision="bf16")
    assert served.backend == "torch" and "the network runs on torch: Check 'x' failed" in caplog.text


def test_the_service_default_is_auto(monkeypatch):
    from app import settings

    monkeypatch.delenv("SEG_BACKEND")
    assert settings.from_environment()["BACKEND"] == "auto"


def test_predict_py_runs_on_the_backend_it_is_given(checkpoint, tmp_path, monkeypatch):
    import predict

    forwards = []
    real = predictor_module.OpenVINOForward
    monkeypatch.setattr(predictor_module, "OpenVINOForward", lambda *args: forwards.append(1) or real(*args))
    noise_image(90, 70).save(tmp_path / "photo.jpg")
    arguments = ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "photo.jpg"),
                 "--out", str(tmp_path / "out")]
    assert predict.main([*arguments, "--backend", "openvino"]) == 0
    assert forwards == [1] and (tmp_path / "out" / "photo_overlay.jpg").exists()


def test_other_checkpoints_files_and_dead_writers_staging_leave_the_cache(tmp_path):
    folder = tmp_path / "tiny.pth.openvino"
    (folder / ".staging-dead").mkdir(parents=True)
    (folder / ".staging-writing").mkdir()
    old = time.time() - openvino_runtime.STAGING_MAX_AGE_S - 60
    os.utime(folder / ".staging-dead", (old, old))
    for name in ("mine.xml", "mine.json", "theirs.xml", "theirs.bin"):
        (folder / name).write_text("x")
    openvino_runtime.remove_others(folder, "mine")
    assert sorted(path.name for path in folder.iterdir()) == [".staging-writing", "mine.json", "mine.xml"]
