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

from app import create_app
from app.settings import DEFAULT_CHECKPOINT
from model.predictor import Predictor
from tests.conftest import ROOT, SHARED_DATA
from utils.checkpoint import load_checkpoint

CARD = ROOT / "MODEL_CARD.md"
RECORD = DEFAULT_CHECKPOINT.with_suffix(".json")


def test_checkpoint_loads_by_metadata_and_fits_the_size_budget():
    checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)
    meta = checkpoint["meta"]
    assert meta["arch"] == "unet" and meta["num_classes"] == 91 and meta["class_names"][1] == "person"
    assert meta["metrics"]["miou"] > 0
    assert DEFAULT_CHECKPOINT.stat().st_size <= 20 * 1024 * 1024


def test_hash_matches_the_model_card():
    digest = hashlib.sha256(DEFAULT_CHECKPOINT.read_bytes()).hexdigest()
    stated = re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", CARD.read_text())
    assert stated and stated.group(1) == digest
    assert json.loads(RECORD.read_text())["sha256"] == digest


def test_predicts_the_recorded_class_map_on_a_fixed_real_image():
    record = json.loads(RECORD.read_text())["reference"]
    image_path = SHARED_DATA / record["image"]
    if not image_path.exists():
        pytest.skip(f"{image_path} is absent (the reference image lives in ../shared/data)")
    predictor = Predictor.from_checkpoint(DEFAULT_CHECKPOINT, precision="fp32")
    predicted = predictor.predict(Image.open(image_path)).class_map
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
    assert response.get_json()["model"] == {"architecture": "unet", "checkpoint": "model.pth"}
