"""A short training run of the SMP U-Net with pretrained encoder weights and a distillation
teacher: its checkpoint records where the encoder's weights came from, and test.py, predict.py
and the service load it by its metadata alone.  Distillation and the never-predicted COCO ids
are checked on their own as well."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import mobilenet_v2 as torchvision_mobilenet_v2

import predict
import test as test_script
import train
from app import create_app
from model import build_model, model_meta
from model.deeplab_voc import DeepLabV3VOC, load_voc_teacher
from model.encoder_weights import load_encoder_weights
from model.smp_models import AnySizeModel, load_voc_head
from tests.synthetic_coco import make_training_root
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.classes import (
    COCO_CLASSES,
    COCO_UNUSED_IDS,
    IGNORE_INDEX,
    VOC_CLASSES,
    VOC_TO_COCO_NAMES,
    teacher_groups,
)
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils.inference.predictor import Predictor
from utils.training.distillation import GroupedDistillation
from utils.training.prepare import TrainingError, check_options

ENCODER_RUN = ["--model", "smp_unet", "--encoder", "mobilenet_v2", "--encoder-output-stride", "16",
               "--crop-size", "64", "--batch-size", "2", "--workers", "0", "--epochs", "2", "--max-steps", "3",
               "--loss", "ce", "--lr", "1e-3", "--train-split", "train2017", "--val-split", "train2017"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_training_root(tmp_path_factory.mktemp("encoder-train"), num_images=6, size=(64, 80), seed=3,
                              max_objects=3)


@pytest.fixture(scope="module")
def voc_weights(tmp_path_factory) -> Path:
    """A random DeepLab VOC state dict: as encoder weights (``backbone.*``) and as the teacher."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "voc.pth"
    torch.save(file_layout(DeepLabV3VOC()), path)
    return path


def file_layout(teacher: DeepLabV3VOC) -> dict[str, torch.Tensor]:
    """The state dict as the converted file stores it: the head's convolutions at the top level."""
    return {key.removeprefix("head."): value for key, value in teacher.state_dict().items()}


@pytest.fixture(scope="module")
def trained(coco_root, voc_weights, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("save")
    code = train.main(["--data-dir", str(coco_root), "--mask-dir", str(coco_root / "masks"), "--save-dir", str(save),
                       *ENCODER_RUN, "--encoder-weights", str(voc_weights), "--voc-head", str(voc_weights),
                       "--distill-from", str(voc_weights)])
    assert code == 0
    return save


def test_checkpoint_records_architecture_encoder_and_weight_source(trained, voc_weights):
    meta = load_checkpoint(trained / "model_final.pth")["meta"]
    assert meta["arch"] == "smp_unet"
    assert meta["arch_args"] == {"num_classes": 91, "encoder": "mobilenet_v2", "encoder_output_stride": 16,
                                 "voc_head": True}
    assert meta["encoder_weights"] == {"source": "voc.pth",
                                       "sha256": hashlib.sha256(voc_weights.read_bytes()).hexdigest()}


def test_encoder_starts_from_the_file(coco_root, voc_weights, tmp_path):
    # One step at encoder lr 0 leaves the encoder exactly as loaded (BatchNorm statistics frozen too).
    code = train.main(["--data-dir", str(coco_root), "--mask-dir", str(coco_root / "masks"), "--save-dir",
                       str(tmp_path), *ENCODER_RUN, "--epochs", "1", "--max-steps", "1",  # the last value counts
                       "--encoder-weights", str(voc_weights), "--encoder-lr-factor", "0"])
    assert code == 0
    saved = load_checkpoint(tmp_path / "model_final.pth")["model"]
    for key, value in torch.load(voc_weights, weights_only=True).items():
        if key.startswith("backbone."):
            assert torch.equal(saved["net.encoder.features." + key.removeprefix("backbone.")], value), key


def test_test_predict_and_service_load_it_by_metadata(trained, coco_root, tmp_path):
    data = ["--data-dir", str(coco_root), "--mask-dir", str(coco_root / "masks"), "--save-dir", str(tmp_path)]
    assert test_script.main(["--checkpoint", str(trained / "best.pth"), "--val-split", "train2017",
                             "--workers", "0", *data]) == 0
    assert "miou" in json.loads((tmp_path / "metrics.json").read_text())

    image = next((coco_root / "train2017").glob("*.jpg"))
    assert predict.main(["--checkpoint", str(trained / "best.pth"), "--input", str(image),
                         "--out", str(tmp_path / "pred")]) == 0
    assert any((tmp_path / "pred").iterdir())

    client = create_app({"CHECKPOINT": str(trained / "best.pth"), "RESULTS_DIR": str(tmp_path / "results")})
    response = client.test_client().post("/json", data={"file": (io.BytesIO(image.read_bytes()), "a.jpg")},
                                         content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["model"]["architecture"] == "smp_unet"


def test_voc_head_starts_the_model_at_deeplabs_answer(voc_weights):
    model = build_model("smp_unet", num_classes=91, encoder="mobilenet_v2", encoder_output_stride=16, voc_head=True)
    load_encoder_weights(model, str(voc_weights), "mobilenet_v2")
    assert "20 classes" in load_voc_head(model, str(voc_weights), COCO_CLASSES)
    with torch.no_grad():  # silence the U-Net's own (random) logits: what is left is the VOC head's
        model.net.segmentation_head[0].weight.zero_()
        model.net.segmentation_head[0].bias.zero_()
        images = torch.randn(1, 3, 64, 96)
        student = model.eval()(images)
        teacher = load_voc_teacher(voc_weights)(images)
    for voc_index, name in enumerate(VOC_CLASSES):
        coco_index = COCO_CLASSES.index(VOC_TO_COCO_NAMES.get(name, name))
        torch.testing.assert_close(student[:, coco_index], teacher[:, voc_index], atol=1e-4, rtol=1e-4)
    assert student[:, COCO_CLASSES.index("truck")].abs().max() == 0


@pytest.mark.parametrize("logit_stride", [1, 4])
def test_with_its_mapping_at_zero_the_voc_head_model_is_smps_own_unet(logit_stride):
    """UNetWithVOCHead.encode walks MobileNetV2's blocks itself to tap block 17 as well: its
    features must stay the ones SMP's encoder hands its decoder (an SMP upgrade could move them)."""
    torch.manual_seed(0)
    model = build_model("smp_unet", num_classes=5, encoder="mobilenet_v2", encoder_output_stride=16,
                        voc_head=True, logit_stride=logit_stride).eval()
    images = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        assert model.voc_to_classes.weight.abs().max() == 0
        logits = model(images)
        assert logits.shape == (1, 5, 70, 100)
        torch.testing.assert_close(logits, AnySizeModel.forward(model, images))


def test_a_wrong_voc_head_file_is_named_in_one_line(tmp_path):
    model = build_model("smp_unet", num_classes=91, encoder="mobilenet_v2", encoder_output_stride=16, voc_head=True)
    imagenet_like = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision_mobilenet_v2().state_dict(), imagenet_like)
    with pytest.raises(CheckpointError, match=f"^{imagenet_like} is not the DeepLabV3") as caught:
        load_voc_head(model, str(imagenet_like), COCO_CLASSES)
    assert "\n" not in str(caught.value)


def test_a_voc_head_for_classes_voc_does_not_know_is_refused(voc_weights):
    model = build_model("smp_unet", num_classes=3, encoder="mobilenet_v2", encoder_output_stride=16, voc_head=True)
    with pytest.raises(ValueError, match="^none of the dataset's classes is a VOC class"):
        load_voc_head(model, str(voc_weights), ["background", "flood", "road"])


def test_a_voc_head_without_its_encoder_is_refused(voc_weights):
    options = ["--model", "smp_unet", "--encoder-output-stride", "16", "--voc-head", str(voc_weights)]
    with pytest.raises(TrainingError, match="--voc-head needs the encoder it was trained on"):
        check_options(train.parse_args(options))
    check_options(train.parse_args([*options, "--encoder-weights", str(voc_weights)]))


def test_voc_head_needs_the_dilated_mobilenet():
    with pytest.raises(ValueError, match="output stride 16"):
        build_model("smp_unet", num_classes=3, encoder="mobilenet_v2", voc_head=True)


# ---------------------------------------------------------------- distillation


def test_voc_classes_group_the_coco_classes_of_the_same_name():
    groups = teacher_groups(VOC_CLASSES, COCO_CLASSES)
    assert groups[COCO_CLASSES.index("airplane")] == VOC_CLASSES.index("aeroplane")
    assert groups[COCO_CLASSES.index("tv")] == VOC_CLASSES.index("tvmonitor")
    assert groups[COCO_CLASSES.index("person")] == VOC_CLASSES.index("person")
    assert groups[COCO_CLASSES.index("truck")] == 0 and groups[0] == 0
    assert sorted(set(groups)) == list(range(len(VOC_CLASSES)))  # every VOC class has a COCO counterpart


class FixedTeacher(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_distillation_is_zero_when_the_grouped_student_agrees_and_positive_otherwise():
    teacher_classes, student_classes = ["background", "cat"], ["background", "cat", "truck"]
    teacher_logits = torch.tensor([0.3, 1.2]).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
    teacher_probs = teacher_logits.softmax(1)
    # Student: cat = teacher's cat; background and truck share the teacher's background.
    student = torch.stack([teacher_probs[:, 0] * 0.25, teacher_probs[:, 1], teacher_probs[:, 0] * 0.75], 1).log()
    loss = GroupedDistillation(FixedTeacher(teacher_logits), teacher_classes, student_classes)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    assert loss(torch.zeros(1, 3, 2, 2), student, target).item() == pytest.approx(0, abs=1e-5)
    assert loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), target).item() > 0.01


def test_distillation_leaves_out_ignore_pixels_and_classes_the_teacher_cannot_name():
    teacher_logits = torch.randn(1, 2, 2, 2)
    loss = GroupedDistillation(FixedTeacher(teacher_logits), ["background", "cat"], ["background", "cat", "truck"])
    student = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])  # truck and ignore pixels: the teacher has no say
    changed = student.clone()
    changed[..., 1, :] = torch.randn(3, 2)
    images = torch.zeros(1, 3, 2, 2)
    assert loss(images, student, target).item() == pytest.approx(loss(images, changed, target).item())
    changed[..., 0, 0] += torch.tensor([5.0, -5.0, 0.0])
    assert loss(images, student, target).item() != pytest.approx(loss(images, changed, target).item())


# ---------------------------------------------------------------- COCO's unused ids


def test_a_coco_checkpoint_never_predicts_the_ids_coco_never_uses(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet", num_classes=91, base_width=4)
    with torch.no_grad():  # a head that shouts "unused-12" and "unused-26" everywhere
        model.outc.bias[list(COCO_UNUSED_IDS[:2])] = 100.0
    meta = model_meta("unet", {"num_classes": 91, "base_width": 4}, COCO_CLASSES, [64, 64], IMAGENET_MEAN,
                      IMAGENET_STD)
    save_checkpoint(tmp_path / "coco.pth", {"model": model.state_dict(), "meta": meta})
    prediction = Predictor.from_checkpoint(tmp_path / "coco.pth", precision="fp32").predict(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)))
    assert not set(np.unique(prediction.class_map)) & set(COCO_UNUSED_IDS)
    assert (prediction.confidence <= 1).all() and (prediction.confidence > 0).all()
