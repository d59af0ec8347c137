"""Every registered architecture on CPU: shapes at odd sizes, a few training steps, the
checkpoint -> Predictor round trip, and local pretrained weights.  Tiny inputs keep it quick;
the ResNet-101 models only build and run forward once."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import mobilenet_v2, resnet18
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

import train
from model import build_model, load_pretrained, main_logits, model_meta
from model.deeplabv3plus import DeepLabV3Plus
from model.encoder_weights import IGNORED_SUFFIXES, load_encoder_weights
from model.registry import ARCHITECTURES
from utils.checkpoint import save_checkpoint
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils.inference.predictor import Predictor
from utils.training.prepare import TrainingError, check_options
from utils.training.train import compute_loss

NUM_CLASSES = 3
CLASS_NAMES = ["background", "cat", "dog"]
ODD_SIZE = (65, 47)
EXTRA_ARGS = {"unet": {"base_width": 4}, "segnet": {"base_width": 8}}  # the rest at their default widths
HEAVY = {"deeplabv3_resnet101", "fcn_resnet101"}
QUICK_TO_TRAIN = ["unet", "deeplabv3plus_mobilenetv2", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
                  "smp_fpn", "smp_pspnet", "deeplabv3plus_xception", "segnet"]


def takes_aux_loss(arch: str) -> bool:
    return "aux_loss" in inspect.signature(ARCHITECTURES[arch].build).parameters


def arch_args(arch: str, **overrides) -> dict:
    return {"num_classes": NUM_CLASSES, **EXTRA_ARGS.get(arch, {}), **overrides}


def seeded_model(arch: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, **arch_args(arch, **overrides))


def outputs_as_dict(outputs: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return outputs if isinstance(outputs, dict) else {"out": outputs}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_predicts_at_the_input_size(arch):
    # The auxiliary head, where there is one, is built too so that its output is checked as well.
    model = seeded_model(arch, **({"aux_loss": True} if takes_aux_loss(arch) else {})).eval()
    with torch.no_grad():
        outputs = outputs_as_dict(model(torch.randn(1, 3, *ODD_SIZE)))
    assert set(outputs) == ({"out", "aux"} if takes_aux_loss(arch) else {"out"})
    for logits in outputs.values():
        assert logits.shape == (1, NUM_CLASSES, *ODD_SIZE)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("aux_loss", [False, True])
def test_aux_loss_adds_the_auxiliary_output(aux_loss):
    model = seeded_model("deeplabv3_mobilenet_v3_large", aux_loss=aux_loss).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 32, 32))
    assert ("aux" in outputs) == aux_loss


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplabv3plus_keeps_the_output_stride_and_trains_on_single_images(output_stride):
    model = seeded_model("deeplabv3plus_mobilenetv2", output_stride=output_stride).train()
    aspp_input_sizes = []
    model.aspp.register_forward_hook(lambda module, inputs, output: aspp_input_sizes.append(inputs[0].shape[-2:]))
    # Batch size 1 in training mode: BatchNorm after the image pooling would fail here.
    logits = model(torch.randn(1, 3, *ODD_SIZE))
    logits.mean().backward()
    assert logits.shape == (1, NUM_CLASSES, *ODD_SIZE)
    assert aspp_input_sizes == [tuple(math.ceil(side / output_stride) for side in ODD_SIZE)]


def test_deeplabv3plus_rejects_other_output_strides():
    with pytest.raises(ValueError, match="output_stride must be one of \\[8, 16\\], got 32"):
        DeepLabV3Plus(num_classes=NUM_CLASSES, output_stride=32)


@pytest.mark.parametrize("arch", QUICK_TO_TRAIN)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(arch):
    model = seeded_model(arch, **({"aux_loss": True} if takes_aux_loss(arch) else {})).train()
    images = torch.randn(2, 3, 64, 64)
    # One vertical stripe per class: a target a few steps can fit, unlike per-pixel noise.
    masks = (torch.arange(64) * NUM_CLASSES // 64).expand(2, 64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    losses = []
    for _ in range(5):
        loss = compute_loss(criterion, model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - HEAVY))
def test_a_saved_checkpoint_serves_through_the_predictor(tmp_path, arch):
    model = seeded_model(arch).eval()
    meta = model_meta(arch, arch_args(arch), CLASS_NAMES, [64, 64], IMAGENET_MEAN, IMAGENET_STD)
    path = tmp_path / "model.pth"
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta})

    predictor = Predictor.from_checkpoint(path, device="cpu")
    path.unlink()  # ResNet-50 checkpoints weigh ~150 MB, and pytest keeps its last three tmp dirs
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    prediction = predictor.predict(photo)

    assert prediction.class_map.shape == (37, 50)
    assert prediction.class_map.max() < NUM_CLASSES
    rebuilt = predictor.model.state_dict()
    assert all(torch.equal(rebuilt[key], value) for key, value in model.state_dict().items())
    batch, _ = predictor.preprocess(photo)
    with torch.no_grad():
        served, trained = predictor.forward(batch).argmax(1), main_logits(model(batch)).argmax(1)
    assert (served == trained).float().mean() > 0.999  # memory layouts may round a near-tie apart


def test_a_torchvision_mobilenet_v2_file_fills_the_deeplabv3plus_backbone(tmp_path):
    model = seeded_model("deeplabv3plus_mobilenetv2")
    torch.manual_seed(1)
    backbone = mobilenet_v2(weights=None).state_dict()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(backbone, path)

    message = load_pretrained(model, str(path))

    loaded = model.features.state_dict()
    assert message == f"{len(loaded)} of {len(model.state_dict())} tensors loaded from {path}"
    assert all(torch.equal(value, backbone[f"features.{key}"]) for key, value in loaded.items())


def test_a_torchvision_segmentation_file_loads_all_but_the_class_layer(tmp_path):
    model = seeded_model("deeplabv3_mobilenet_v3_large")
    torch.manual_seed(1)
    voc_state = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).state_dict()
    path = tmp_path / "deeplabv3_voc.pth"
    torch.save(voc_state, path)

    message = load_pretrained(model, str(path))

    own = model.state_dict()
    class_layer = {key for key, value in own.items() if value.shape != voc_state[key].shape}
    assert class_layer == {"classifier.4.weight", "classifier.4.bias"}
    assert message == f"{len(own) - 2} of {len(own)} tensors loaded from {path}"
    assert all(torch.equal(own[key], voc_state[key]) for key in own.keys() - class_layer)


def test_a_weights_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="no tensor matches"):
        load_pretrained(seeded_model("deeplabv3plus_mobilenetv2"), str(path))


def test_segnet_unpooling_puts_each_maximum_back_where_it_was_pooled():
    model = seeded_model("segnet")
    pool, unpool = model.encoder[0].pool, model.decoder[-1].unpool  # a stage and its mirror
    features = torch.randperm(35, generator=torch.Generator().manual_seed(0)).float().reshape(1, 1, 5, 7)
    pooled, indices = pool(features)
    restored = unpool(pooled, indices, output_size=features.shape)

    assert restored.shape == features.shape  # the odd last row and column come back (empty)
    windows = features[..., :4, :6].reshape(1, 1, 2, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(1, 1, 2, 3, 4)
    is_window_max = restored != 0
    assert torch.equal(restored[is_window_max], features[is_window_max])
    assert sorted(restored[is_window_max].tolist()) == sorted(windows.amax(-1).flatten().tolist())
    assert is_window_max.sum() == 6 and not is_window_max[..., 4, :].any() and not is_window_max[..., :, 6].any()


def test_segnet_decoder_unpools_with_its_mirrored_encoder_stage():
    """In a real forward, each decoder stage puts its input values exactly at the positions its
    mirrored encoder stage pooled from, and zeros everywhere else."""
    model = seeded_model("segnet").eval()
    encoder_indices, unpoolings = [], []
    for stage in model.encoder:
        stage.pool.register_forward_hook(lambda module, inputs, output: encoder_indices.append(output[1]))
    for stage in model.decoder:
        stage.unpool.register_forward_hook(
            lambda module, inputs, kwargs, output: unpoolings.append((*inputs, kwargs["output_size"], output)),
            with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(1, 3, *ODD_SIZE))
    assert len(unpoolings) == len(encoder_indices) == 5
    for (features, indices, size, unpooled), mirrored in zip(unpoolings, encoder_indices[::-1], strict=True):
        assert torch.equal(indices, mirrored) and unpooled.shape[-2:] == size[-2:]
        flat = unpooled.flatten(2)
        assert torch.equal(flat.gather(2, indices.flatten(2)), features.flatten(2))
        elsewhere = torch.ones_like(flat, dtype=torch.bool).scatter(2, indices.flatten(2), False)
        assert not flat[elsewhere].any()


def test_segnet_refuses_inputs_below_32_pixels_in_one_line():
    with pytest.raises(ValueError, match="SegNet needs inputs of at least 32x32 pixels"):
        seeded_model("segnet")(torch.randn(1, 3, 31, 64))


@pytest.mark.parametrize(("arch", "stride"), [("smp_pspnet", 8), ("smp_fpn", 32), ("deeplabv3plus_xception", 16)])
def test_smp_models_pad_odd_inputs_to_their_encoder_stride(arch, stride):
    model = seeded_model(arch).eval()
    padded_sizes = []
    model.net.register_forward_pre_hook(lambda module, inputs: padded_sizes.append(inputs[0].shape[-2:]))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *ODD_SIZE))
    assert logits.shape == (1, NUM_CLASSES, *ODD_SIZE)
    assert padded_sizes == [tuple(math.ceil(side / stride) * stride for side in ODD_SIZE)]


@pytest.mark.parametrize("arch", ["deeplabv3plus_xception", "deeplabv3_mobilenet_v3_large"])
def test_models_with_batchnorm_after_global_pooling_refuse_a_batch_of_one(arch):
    with pytest.raises(TrainingError, match="cannot train on one image per batch"):
        check_options(train.parse_args(["--model", arch, "--batch-size", "1"]))
    check_options(train.parse_args(["--model", arch, "--batch-size", "2"]))


def forward_flops(model: torch.nn.Module, size: tuple[int, int]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, 3, *size))
    return counter.get_total_flops()


# MobileNetV2 is light beside its decoder (and loses its 1x1 expansion to 1280); ResNet-18 is not.
@pytest.mark.parametrize(("encoder", "flops_ratio"), [("mobilenet_v2", 0.3), ("resnet18", 0.6)])
def test_smp_unet_at_logit_stride_4_answers_at_the_input_size_for_a_fraction_of_the_flops(encoder, flops_ratio):
    quarter = seeded_model("smp_unet", encoder=encoder, logit_stride=4)
    with torch.no_grad():
        assert quarter.eval()(torch.randn(1, 3, *ODD_SIZE)).shape == (1, NUM_CLASSES, *ODD_SIZE)
    full = seeded_model("smp_unet", encoder=encoder)
    assert forward_flops(quarter, (128, 160)) < flops_ratio * forward_flops(full, (128, 160))


def test_smp_unet_at_logit_stride_4_takes_an_imagenet_mobilenet_v2_file_but_its_1280_expansion(tmp_path):
    model = seeded_model("smp_unet", logit_stride=4)
    torch.manual_seed(1)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(mobilenet_v2(weights=None).state_dict(), path)
    report = load_encoder_weights(model, str(path), "mobilenet_v2")
    weights = [key for key in mobilenet_v2().state_dict() if not key.endswith(IGNORED_SUFFIXES)]
    assert report.missing == []
    assert report.loaded == sum(1 for key in model.encoder.state_dict() if not key.endswith(IGNORED_SUFFIXES))
    unused = [key for key in weights if not key.startswith("features.") or key.startswith("features.18.")]
    assert report.unused == len(unused)
