"""The bf16 accuracy guard: its figures, its rule, the sidecar record and the command end to end."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.synthetic_coco import make_coco
from tests.tiny_checkpoint import make_checkpoint
from tools import guard_precision
from utils import precision
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.classes import COCO_CLASSES
from utils.data.coco_convert import convert
from utils.inference import openvino_runtime, precision_guard
from utils.inference import predictor as predictor_module
from utils.inference.precision_guard import (
    MAX_MIOU_DROP_POINTS,
    MIN_AGREEMENT,
    MIN_IMAGE_AGREEMENT,
    compare_precisions,
    guard_path,
    passes,
    precision_allowed,
    read_guard,
    write_guard,
)
from utils.inference.predictor import Predictor
from utils.precision import cpu_kind


@pytest.fixture
def native_bf16(monkeypatch):
    """Every CPU can run bf16 autocast (emulated where it lacks the instructions), so the choice
    the service makes on a bf16 CPU is tested on any machine."""
    monkeypatch.setattr(predictor_module, "cpu_supports_bf16", lambda: True)


@pytest.fixture(scope="module")
def coco_val(tmp_path_factory):
    """Five synthetic COCO images with their masks, in the layout build_dataset reads."""
    root = tmp_path_factory.mktemp("val")
    coco = make_coco(root, num_images=5, split="val2017")
    convert(coco.annotation_file, coco.image_dir, root / "masks" / "val2017")
    return root


def decisive_checkpoint(path):
    """A tiny COCO-class checkpoint whose background logit wins by far: fp32 and bf16 agree."""
    make_checkpoint(path, class_names=list(COCO_CLASSES))
    checkpoint = load_checkpoint(path)
    checkpoint["model"]["outc.bias"][0] += 50
    save_checkpoint(path, checkpoint)
    return path


def guard_command(checkpoint, data_root, *extra: str) -> int:
    return guard_precision.main(["--checkpoint", str(checkpoint), "--data-dir", str(data_root),
                                 "--mask-dir", str(data_root / "masks"), "--val-split", "val2017", *extra])


def rule(agreement: float, worst_image: float, drop: float | None) -> bool:
    return passes({"agreement": agreement, "worst_image_agreement": worst_image, "miou_drop_points": drop})


def test_the_rule_needs_agreement_overall_and_on_every_image_and_a_small_miou_drop():
    assert rule(MIN_AGREEMENT, MIN_IMAGE_AGREEMENT, MAX_MIOU_DROP_POINTS)
    assert rule(1.0, 1.0, -0.5)  # the reduced precision scoring higher is no reason to refuse it
    assert not rule(MIN_AGREEMENT - 1e-4, 1.0, 0.0)
    assert not rule(1.0, MIN_IMAGE_AGREEMENT - 1e-4, 0.0)  # one photo a user would see changed
    assert not rule(1.0, 1.0, MAX_MIOU_DROP_POINTS + 1e-3)
    assert not rule(1.0, 1.0, None)
    # A verdict measured before the per-image floor has no figure for it: refused, not assumed.
    assert not passes({"agreement": 1.0, "miou_drop_points": 0.0})


def test_compare_precisions_counts_agreeing_pixels_and_both_mious():
    mask = np.array([[1, 1], [2, 255]], dtype=np.uint8)  # 255: ignored by mIoU, counted for agreement
    exact = np.array([[1, 1], [2, 0]], dtype=np.uint8)
    one_off = np.array([[1, 2], [2, 0]], dtype=np.uint8)
    margin = np.array([[0.9, 0.05], [0.5, 0.5]], dtype=np.float32)  # the changed pixel was a near-tie
    samples = [(np.zeros((2, 2, 3), np.uint8), mask)] * 2 + [(np.zeros((2, 2, 3), np.uint8), exact)]
    maps = iter([one_off, one_off, exact])
    figures = compare_precisions(lambda image: (exact, margin), lambda image: next(maps), samples, num_classes=3)
    assert figures["images"] == 3 and figures["pixels"] == 12
    assert figures["agreement"] == pytest.approx(10 / 12)
    assert figures["worst_image_agreement"] == pytest.approx(3 / 4) and figures["worst_image"] == 0
    assert figures["images_below_floor"] == 2
    assert figures["disagreements"] == {"pixels": 2, "near_tie_share": 1.0, "median_fp32_margin": pytest.approx(0.05),
                                        "near_tie": 0.1}
    # fp32 is right everywhere; the other loses class 1 to 4/6 (two misses) and class 2 to 3/5 (two false hits).
    assert figures["worst_class"] == {"class_id": 2, "iou_fp32": pytest.approx(1.0), "iou_reduced": pytest.approx(0.6),
                                      "change_points": pytest.approx(-40.0)}


def test_compare_precisions_scores_both_mious():
    mask = np.array([[1, 1], [2, 255]], dtype=np.uint8)  # 255: ignored by mIoU, counted for agreement
    exact = np.array([[1, 1], [2, 0]], dtype=np.uint8)
    one_off = np.array([[1, 2], [2, 0]], dtype=np.uint8)
    margin = np.ones((2, 2), np.float32)
    figures = compare_precisions(lambda image: (exact, margin), lambda image: one_off,
                                 [(np.zeros((2, 2, 3), np.uint8), mask)] * 3, num_classes=3)
    assert figures["agreement"] == pytest.approx(9 / 12)
    assert figures["miou_fp32"] == pytest.approx(1.0)
    # bf16: class 1 IoU 1/2 (1 hit, 1 missed), class 2 IoU 1/2 (1 hit, 1 false positive).
    assert figures["miou_bf16"] == pytest.approx(0.5)
    assert figures["miou_drop_points"] == pytest.approx(50.0)


def test_the_command_records_a_passing_verdict_that_makes_auto_serve_bf16(tmp_path, coco_val, native_bf16, capsys):
    checkpoint = decisive_checkpoint(tmp_path / "model.pth")
    untouched = checkpoint.read_bytes()

    assert guard_command(checkpoint, coco_val) == 0

    record = json.loads(guard_path(checkpoint).read_text())["verdicts"]["cpu/bf16"]
    assert record["images"] == 5 and record["agreement"] == 1.0
    assert record["miou_drop_points"] == pytest.approx(0.0)
    assert record["ok"] is True and read_guard(checkpoint) == record
    assert checkpoint.read_bytes() == untouched  # the verdict lives beside the checkpoint, not in it
    assert "bf16 allowed" in capsys.readouterr().out
    assert Predictor.from_checkpoint(checkpoint, device="cpu").precision == "bf16"


def test_the_command_judges_openvino_bf16_into_its_own_verdict(tmp_path, coco_val, monkeypatch, capsys):
    monkeypatch.setattr(openvino_runtime, "cpu_supports_bf16", lambda: True)  # the hint is taken on any CPU
    checkpoint = decisive_checkpoint(tmp_path / "model.pth")

    assert guard_command(checkpoint, coco_val, "--backend", "openvino", "--limit", "2") == 0

    assert read_guard(checkpoint, "cpu", "bf16") is None  # torch's bf16 is not what was judged
    record = read_guard(checkpoint, "openvino", "bf16")
    assert record["images"] == 2 and record["ok"] is True
    assert "bf16 allowed" in capsys.readouterr().out
    served = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto")
    assert (served.backend, served.precision) == ("openvino", "bf16")


def test_the_command_refuses_openvino_bf16_on_a_cpu_without_it(tmp_path, coco_val, monkeypatch, capsys):
    monkeypatch.setattr(openvino_runtime, "cpu_supports_bf16", lambda: False)
    checkpoint = decisive_checkpoint(tmp_path / "model.pth")
    assert guard_command(checkpoint, coco_val, "--backend", "openvino", "--limit", "1") == 2
    assert "no native bf16" in capsys.readouterr().err
    assert not guard_path(checkpoint).exists()


def test_a_failing_verdict_keeps_auto_on_fp32(tmp_path, native_bf16):
    checkpoint = make_checkpoint(tmp_path / "model.pth")
    record = write_guard(checkpoint, {"agreement": 0.98, "worst_image_agreement": 0.98, "miou_fp32": 0.5,
                                      "miou_bf16": 0.5, "miou_drop_points": 0.0, "images": 1, "pixels": 100})
    assert record["ok"] is False
    assert not precision_allowed(checkpoint)
    assert Predictor.from_checkpoint(checkpoint, device="cpu").precision == "fp32"


def test_a_verdict_for_another_checkpoint_is_ignored(tmp_path, coco_val, native_bf16):
    checkpoint = decisive_checkpoint(tmp_path / "model.pth")
    assert guard_command(checkpoint, coco_val, "--limit", "2") == 0
    assert precision_allowed(checkpoint)

    make_checkpoint(checkpoint, class_names=list(COCO_CLASSES), base_width=2)  # retrained to the same path

    assert read_guard(checkpoint) is None
    assert Predictor.from_checkpoint(checkpoint, device="cpu").precision == "fp32"


def test_an_unreadable_record_is_no_verdict(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model.pth")
    guard_path(checkpoint).write_text("{not json")
    assert read_guard(checkpoint) is None and not precision_allowed(checkpoint)


def test_the_command_refuses_a_dataset_with_other_classes_in_one_line(tmp_path, coco_val, native_bf16, capsys):
    checkpoint = make_checkpoint(tmp_path / "model.pth")  # 3 classes, the dataset has 91
    assert guard_command(checkpoint, coco_val) == 2
    error = capsys.readouterr().err.strip()
    assert error == "error: the checkpoint has 3 classes but the dataset 91"
    assert not guard_path(checkpoint).exists()


def test_the_command_names_a_missing_folder_in_one_line(tmp_path, native_bf16, capsys):
    checkpoint = make_checkpoint(tmp_path / "model.pth")
    assert guard_command(checkpoint, tmp_path / "nowhere") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "nowhere" in error and "\n" not in error


def test_bf16_class_maps_match_fp32_where_the_network_is_decisive(tmp_path, native_bf16):
    checkpoint = decisive_checkpoint(tmp_path / "model.pth")
    image = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8).numpy()
    maps = [Predictor.from_checkpoint(checkpoint, device="cpu", precision=precision).predict(Image.fromarray(image))
            for precision in ("fp32", "bf16")]
    np.testing.assert_array_equal(maps[0].class_map, maps[1].class_map)


FIGURES = {"agreement": 1.0, "worst_image_agreement": 1.0, "miou_fp32": 0.5, "miou_drop_points": 0.0, "images": 1,
           "pixels": 100}


def test_each_device_and_dtype_has_its_own_verdict(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model.pth")
    write_guard(checkpoint, dict(FIGURES, miou_bf16=0.5))
    assert precision_allowed(checkpoint, "cpu", "bf16") and not precision_allowed(checkpoint, "cuda", "fp16")
    write_guard(checkpoint, dict(FIGURES, agreement=0.9, miou_fp16=0.4), "cuda", "fp16")
    assert precision_allowed(checkpoint, "cpu", "bf16")  # kept beside the new one
    assert read_guard(checkpoint, "cuda", "fp16")["miou_fp16"] == 0.4
    assert not precision_allowed(checkpoint, "cuda", "fp16")
    # CUDA's "auto" reads the cuda/fp16 verdict, never the CPU's bf16 one.
    cuda = torch.device("cuda")
    assert predictor_module.choose_precision("auto", cuda, predictor_module.guard_of(checkpoint, cuda)) == "fp32"
    write_guard(checkpoint, dict(FIGURES, miou_fp16=0.5), "cuda", "fp16")
    assert predictor_module.choose_precision("auto", cuda, predictor_module.guard_of(checkpoint, cuda)) == "fp16"


def test_a_cpu_verdict_names_its_kind_of_cpu_and_serves_on_that_kind_only(tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path / "model.pth")
    write_guard(checkpoint, dict(FIGURES, miou_bf16=0.5))
    write_guard(checkpoint, dict(FIGURES, miou_fp16=0.5), "cuda", "fp16")
    assert read_guard(checkpoint)["cpu"] == cpu_kind() and "cpu" not in read_guard(checkpoint, "cuda", "fp16")
    assert precision_allowed(checkpoint, "cpu", "bf16") and precision_allowed(checkpoint, "cuda", "fp16")
    monkeypatch.setattr(precision_guard, "cpu_kind", lambda: "some other cpu")
    assert not precision_allowed(checkpoint, "cpu", "bf16")
    assert precision_allowed(checkpoint, "cuda", "fp16")  # a GPU verdict is the GPU's


def test_a_record_from_before_verdicts_per_device_is_the_cpu_bf16_verdict(tmp_path, native_bf16):
    checkpoint = make_checkpoint(tmp_path / "model.pth")
    write_guard(checkpoint, dict(FIGURES, miou_bf16=0.5))
    verdict = read_guard(checkpoint)
    legacy = dict(verdict, checkpoint_sha256=json.loads(guard_path(checkpoint).read_text())["checkpoint_sha256"])
    guard_path(checkpoint).write_text(json.dumps(legacy))  # the layout the shipped model's record has
    assert read_guard(checkpoint) == verdict and read_guard(checkpoint, "cuda", "fp16") is None
    assert Predictor.from_checkpoint(checkpoint, device="cpu").precision == "bf16"


def test_the_command_refuses_fp16_on_the_cpu_and_cuda_without_a_gpu_in_one_line(tmp_path, coco_val, capsys):
    checkpoint = make_checkpoint(tmp_path / "model.pth")
    assert guard_command(checkpoint, coco_val, "--dtype", "fp16") == 2
    assert capsys.readouterr().err.strip() == "error: fp16 is served on CUDA only: judge the CPU with --dtype bf16"
    if not torch.cuda.is_available():
        assert guard_command(checkpoint, coco_val, "--device", "cuda", "--dtype", "fp16") == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_fp16_is_asked_for_on_cuda_only():
    with pytest.raises(ValueError, match="fp16 runs on CUDA only"):
        predictor_module.choose_precision("fp16", torch.device("cpu"), lambda dtype: True)
    assert predictor_module.choose_precision("fp16", torch.device("cuda"), lambda dtype: False) == "fp16"


@pytest.mark.parametrize("flags, kind, named", [({"avx2", "fma"}, "avx2", "avx2"),
                                                ({"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16",
                                                 "avx2 avx512f avx512_bf16"),
                                                ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, "amx",
                                                 "avx2 avx512f amx_bf16 amx_tile")])
def test_the_cpu_is_named_by_its_flags_for_verdicts_and_for_timings(monkeypatch, flags, kind, named):
    monkeypatch.setattr(precision, "cpu_model_and_flags", lambda: ("Some CPU", frozenset(flags)))
    assert precision.cpu_kind.__wrapped__() == kind  # past the cache, which holds this machine's
    assert precision.cpu_description() == f"Some CPU, {len(os.sched_getaffinity(0))} cores, {named}"
