"""INT8 on OpenVINO: tools/quantize.py on a tiny model and data set, and the guard that decides
whether the service may run the result."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tests.conftest import requires
from tests.synthetic_coco import make_coco
from tests.test_precision_guard import decisive_checkpoint
from tests.test_predictor import noise_image
from tests.tiny_checkpoint import make_checkpoint
from tools import quantize as quantize_command
from utils.classes import COCO_CLASSES
from utils.data.coco_convert import convert
from utils.fileio import file_sha256
from utils.inference import openvino_runtime
from utils.inference.openvino_runtime import PrecisionRefused, int8_xml
from utils.inference.precision_guard import guard_path, read_guard, write_guard
from utils.inference.predictor import Predictor
from utils.precision import cpu_kind

pytestmark = requires("nncf", reason="quantization needs NNCF (requirements.txt)")

PASSING = {"agreement": 1.0, "worst_image_agreement": 1.0, "miou_fp32": 0.5, "miou_int8": 0.5,
           "miou_drop_points": 0.0, "images": 1, "pixels": 100}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Six training and four validation images of synthetic COCO, with masks."""
    root = tmp_path_factory.mktemp("coco")
    for split, count, seed in (("train2017", 6, 0), ("val2017", 4, 1)):
        data = make_coco(root, num_images=count, split=split, seed=seed)
        convert(data.annotation_file, data.image_dir, root / "masks" / split)
    return root


def quantize(checkpoint, data_root, *extra: str) -> int:
    return quantize_command.main(["--checkpoint", str(checkpoint), "--data-dir", str(data_root),
                                  "--mask-dir", str(data_root / "masks"), "--calibration-images", "4", *extra])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, coco):
    """A tiny COCO-class checkpoint whose INT8 IR passed its guard."""
    checkpoint = decisive_checkpoint(tmp_path_factory.mktemp("int8") / "model.pth")
    assert quantize(checkpoint, coco) == 0
    return checkpoint


def test_the_command_writes_an_int8_ir_whose_passing_verdict_makes_auto_serve_it(quantized, capsys):
    verdict = read_guard(quantized, "openvino", "int8")
    assert verdict["ok"] is True and verdict["images"] == 4 and verdict["calibration_images"] == 4
    assert verdict["worst_image_agreement"] == 1.0 and verdict["disagreements"]["pixels"] == 0
    ir = openvino_runtime.int8_ir(quantized)
    assert any(op.get_type_name() == "FakeQuantize" for op in ir.get_ordered_ops())  # really quantized
    served = Predictor.from_checkpoint(quantized, device="cpu", backend="auto")
    assert (served.backend, served.precision) == ("openvino", "int8")
    fp32 = Predictor.from_checkpoint(quantized, device="cpu", backend="torch", precision="fp32")
    image = noise_image(70, 50)
    np.testing.assert_array_equal(served.predict(image).class_map, fp32.predict(image).class_map)


def test_int8_on_a_network_of_near_ties_changes_classes_and_is_refused(tmp_path, coco, capsys):
    checkpoint = make_checkpoint(tmp_path / "model.pth", class_names=list(COCO_CLASSES), varied=True)
    assert quantize(checkpoint, coco) == 0
    out = capsys.readouterr().out
    verdict = read_guard(checkpoint, "openvino", "int8")
    assert verdict["ok"] is False and verdict["agreement"] < 0.99 and verdict["disagreements"]["pixels"] > 0
    assert "refused, fp32 serves" in out and "no INT8 IR (removed)" in out
    assert not int8_xml(checkpoint).exists() and not int8_xml(checkpoint).with_suffix(".bin").exists()
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "fp32"
    # Kept for a benchmark, the refused IR is still never served.
    assert quantize(checkpoint, coco, "--keep-refused") == 0
    assert int8_xml(checkpoint).exists() and not read_guard(checkpoint, "openvino", "int8")["ok"]
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "fp32"


def test_int8_without_a_passing_verdict_is_refused(tmp_path, quantized):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(quantized.read_bytes())
    for suffix in (".xml", ".bin"):
        int8_xml(checkpoint).with_suffix(suffix).write_bytes(int8_xml(quantized).with_suffix(suffix).read_bytes())
    # No record at all: the IR alone is not trusted.
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "fp32"
    with pytest.raises(PrecisionRefused, match="int8: model.pth has no INT8 IR with a passing guard verdict"):
        Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino", precision="int8")
    # A failing one, naming these very files.
    digests = {key: read_guard(quantized, "openvino", "int8")[key] for key in ("xml_sha256", "bin_sha256")}
    write_guard(checkpoint, dict(PASSING, worst_image_agreement=0.96, **digests), "openvino", "int8")
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "fp32"
    write_guard(checkpoint, dict(PASSING, **digests), "openvino", "int8")
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "int8"


def test_a_checkpoint_replaced_at_the_same_path_never_inherits_the_int8_ir_or_verdict(tmp_path, quantized):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(quantized.read_bytes())
    guard_path(checkpoint).write_text(guard_path(quantized).read_text())
    for suffix in (".xml", ".bin"):
        int8_xml(checkpoint).with_suffix(suffix).write_bytes(int8_xml(quantized).with_suffix(suffix).read_bytes())
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "int8"

    make_checkpoint(checkpoint, class_names=list(COCO_CLASSES), base_width=2)  # retrained to the same path

    assert read_guard(checkpoint, "openvino", "int8") is None
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "fp32"


@pytest.mark.parametrize("part", ["xml", "bin"])
def test_an_int8_ir_that_is_not_the_judged_one_is_never_served(tmp_path, quantized, part, caplog):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(quantized.read_bytes())
    guard_path(checkpoint).write_text(guard_path(quantized).read_text())
    for suffix in (".xml", ".bin"):
        int8_xml(checkpoint).with_suffix(suffix).write_bytes(int8_xml(quantized).with_suffix(suffix).read_bytes())
    changed = int8_xml(checkpoint).with_suffix(f".{part}")
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0x01
    changed.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        served = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto")
    assert served.precision == "fp32" and f"model.pth.int8.{part} is not the INT8 IR its guard verdict judged" \
        in caplog.text


def test_the_command_refuses_a_dataset_with_other_classes_in_one_line(tmp_path, coco, capsys):
    checkpoint = make_checkpoint(tmp_path / "model.pth")  # 3 classes, the dataset has 91
    assert quantize(checkpoint, coco) == 2
    assert capsys.readouterr().err.strip() == "error: the checkpoint has 3 classes but the dataset 91"
    assert not guard_path(checkpoint).exists() and not int8_xml(checkpoint).exists()


def test_the_verdict_records_the_files_it_judged(quantized):
    verdict = json.loads(guard_path(quantized).read_text())["verdicts"]["openvino/int8"]
    for suffix in ("xml", "bin"):
        assert verdict[f"{suffix}_sha256"] == file_sha256(int8_xml(quantized).with_suffix(f".{suffix}"))


def test_the_service_serves_the_guarded_int8_ir_and_says_so(quantized, tmp_path):
    from app import create_app
    from tests.test_app import encoded, photo, post_file

    client = create_app({"CHECKPOINT": str(quantized), "RESULTS_DIR": str(tmp_path / "results"), "TESTING": True,
                         "BACKEND": "auto"}).test_client()
    described = client.get("/api/model").get_json()
    assert (described["backend"], described["precision"]) == ("openvino", "int8")
    answer = post_file(client, encoded(photo()))
    assert answer.status_code == 200 and answer.get_json()["classes"]


@pytest.mark.parametrize("measured_on", ["avx2", None], ids=["another-cpu", "unnamed"])
def test_a_passing_int8_verdict_from_another_kind_of_cpu_is_not_honoured(tmp_path, quantized, measured_on, caplog):
    """INT8 and bf16 kernels round differently on AVX2, VNNI, BF16 and AMX CPUs: a verdict judges its own kind."""
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(quantized.read_bytes())
    for suffix in (".xml", ".bin"):
        int8_xml(checkpoint).with_suffix(suffix).write_bytes(int8_xml(quantized).with_suffix(suffix).read_bytes())
    digests = {key: read_guard(quantized, "openvino", "int8")[key] for key in ("xml_sha256", "bin_sha256")}
    write_guard(checkpoint, dict(PASSING, **digests), "openvino", "int8")
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "int8"
    record = json.loads(guard_path(checkpoint).read_text())
    if measured_on is None:
        del record["verdicts"]["openvino/int8"]["cpu"]
    else:
        record["verdicts"]["openvino/int8"]["cpu"] = "other" if cpu_kind() == measured_on else measured_on
    guard_path(checkpoint).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "fp32"
    assert "the INT8 verdict was measured on a" in caplog.text and f"this one is {cpu_kind()}" in caplog.text


def test_a_pixel_major_int8_ir_from_an_older_version_is_not_served(tmp_path, quantized, caplog):
    """Before the IR kept the logits N x C x H x W, tools/quantize.py wrote them N x H x W x C: the
    graph appended for class and confidence would reduce them over the wrong axis."""
    import openvino as ov
    from openvino import opset13 as ops

    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(quantized.read_bytes())
    ir = ov.Core().read_model(str(int8_xml(quantized)))
    pixel_major = ops.transpose(ir.get_results()[0].input_value(0), ops.constant(np.array([0, 2, 3, 1])))
    ov.save_model(ov.Model([pixel_major], ir.get_parameters()), str(int8_xml(checkpoint)), compress_to_fp16=False)
    digests = {f"{part}_sha256": file_sha256(int8_xml(checkpoint).with_suffix(f".{part}")) for part in ("xml", "bin")}
    write_guard(checkpoint, dict(PASSING, **digests), "openvino", "int8")
    with caplog.at_level(logging.WARNING):
        assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "fp32"
    assert "model.pth.int8.xml has pixel-major logits (made by an older version)" in caplog.text
