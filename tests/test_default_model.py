"""The shipped default model: loads by its metadata, matches its model card, predicts as recorded,
and is what the service serves with no configuration."""
from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from app import create_app
from app.settings import DEFAULT_CHECKPOINT
from tests.conftest import ROOT, SHARED_DATA
from utils.checkpoint import load_checkpoint
from utils.inference.predictor import Predictor

CARD = ROOT / "MODEL_CARD.md"
RECORD = DEFAULT_CHECKPOINT.with_suffix(".json")


@pytest.fixture(scope="module")
def fp32_predictor() -> Predictor:
    """The default model in fp32, loaded once for the tests that predict with it (0.4 s a load,
    AMD EPYC avx512_bf16)."""
    return Predictor.from_checkpoint(DEFAULT_CHECKPOINT, precision="fp32")


def test_checkpoint_loads_by_metadata_and_fits_the_size_budget():
    checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)
    meta = checkpoint["meta"]
    assert meta["arch"] == "smp_unet" and meta["arch_args"]["encoder"] == "mobilenet_v2"
    assert meta["num_classes"] == 91 and meta["class_names"][1] == "person"
    assert meta["encoder_weights"]["source"] == "deeplabv3_mobilenet_v2_voc-tfqat-eeae4f3a.pth"
    assert meta["metrics"]["miou"] > 0
    assert DEFAULT_CHECKPOINT.stat().st_size <= 20 * 1024 * 1024


def test_hash_matches_the_model_card():
    digest = hashlib.sha256(DEFAULT_CHECKPOINT.read_bytes()).hexdigest()
    stated = re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", CARD.read_text())
    assert stated and stated.group(1) == digest
    assert json.loads(RECORD.read_text())["sha256"] == digest


def test_predicts_the_recorded_class_map_on_a_fixed_real_image(fp32_predictor):
    record = json.loads(RECORD.read_text())["reference"]
    image_path = SHARED_DATA / record["image"]
    if not image_path.exists():
        pytest.skip(f"{image_path} is absent (the reference image lives in ../shared/data)")
    predicted = fp32_predictor.predict(Image.open(image_path)).class_map
    recorded = np.asarray(Image.open(DEFAULT_CHECKPOINT.parent / record["prediction"]))
    assert predicted.shape == recorded.shape
    # fp32 kernels may differ in the last bit between CPUs; a preprocessing change moves far more.
    assert (predicted == recorded).mean() >= 0.999
    assert len(np.unique(recorded)) > 1  # the reference is not all background


def test_service_with_no_configuration_serves_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SEG_CHECKPOINT", raising=False)
    client = create_app({"RESULTS_DIR": str(tmp_path)}).test_client()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(buffer, format="JPEG")
    response = client.post("/json", data={"file": (io.BytesIO(buffer.getvalue()), "a.jpg")},
                           content_type="multipart/form-data")
    assert response.status_code == 200
    assert response.get_json()["model"] == {"architecture": "smp_unet", "checkpoint": "model.pth"}


PEOPLE_PHOTOS = ["000000324614.jpg", "000000005001.jpg"]  # coco-tiny val: a person close up, a group


@pytest.mark.parametrize("file_name", PEOPLE_PHOTOS)
def test_finds_most_of_the_annotated_people_in_real_photos(file_name, fp32_predictor):
    """Checked against COCO's own annotation of the photo, not against a recorded prediction."""
    annotations = SHARED_DATA / "coco-tiny" / "annotations" / "instances_val2017.json"
    image_path = SHARED_DATA / "coco-tiny" / "val2017" / file_name
    if not image_path.exists() or not annotations.exists():
        pytest.skip(f"{image_path} is absent (the real photos live in ../shared/data)")
    coco = COCO(str(annotations))
    (image_id,) = [i for i, info in coco.imgs.items() if info["file_name"] == file_name]
    people = coco.loadAnns(coco.getAnnIds(imgIds=image_id, catIds=[1], iscrowd=False))
    truth = np.any([coco.annToMask(annotation) for annotation in people], axis=0)
    predicted = fp32_predictor.predict(Image.open(image_path)).class_map == 1
    assert truth.sum() > 1000
    assert (predicted & truth).sum() / truth.sum() > 0.5  # most person pixels are called person
    assert (predicted & truth).sum() / predicted.sum() > 0.5  # and most of what is called person is one
