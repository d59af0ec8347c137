"""The GPU path of training and inference: AMP, cudnn.benchmark, channels_last, pinned memory.

These run only where CUDA exists; the CPU paths they mirror are tested everywhere.
"""
from __future__ import annotations

import math

import pytest
import torch

import train
from model import build_model
from tests.synthetic_coco import make_coco
from utils.data.coco_convert import convert
from utils.precision import autocast
from utils.training.prepare import prepare
from utils.training.train import train_one_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine; the GPU path is checked where one exists")


@pytest.fixture
def tiny_coco_args(tmp_path):
    for split in ("train2017", "val2017"):
        coco = make_coco(tmp_path, num_images=4, split=split)
        convert(coco.annotation_file, coco.image_dir, tmp_path / "masks" / split)
    return train.parse_args(["--data-dir", str(tmp_path), "--mask-dir", str(tmp_path / "masks"),
                             "--save-dir", str(tmp_path / "save"), "--crop-size", "64", "--batch-size", "2",
                             "--base-width", "4", "--epochs", "1", "--workers", "0", "--device", "cuda"])


def test_cuda_training_uses_amp_cudnn_benchmark_channels_last_and_pinned_memory(tiny_coco_args):
    run = prepare(tiny_coco_args)
    assert torch.backends.cudnn.benchmark
    assert run.train_loader.pin_memory and run.val_loader.pin_memory
    assert run.scaler.is_enabled()  # fp16 AMP needs loss scaling
    kernel = next(p for p in run.bare_model.parameters() if p.dim() == 4)
    assert kernel.is_cuda and kernel.is_contiguous(memory_format=torch.channels_last)
    loss = train_one_epoch(run.model, run.train_loader, run.criterion, run.optimizer, run.scheduler, run.scaler,
                           run.context, epoch=1, max_steps=2, precision="auto")
    assert math.isfinite(loss)


def test_cuda_autocast_runs_convolutions_in_half_precision():
    model = build_model("unet", num_classes=3, base_width=4).cuda().to(memory_format=torch.channels_last).eval()
    images = torch.randn(1, 3, 64, 48, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(images.device, "auto"):
        logits = model(images)
    assert logits.dtype == torch.float16 and logits.shape == (1, 3, 64, 48)
    assert torch.isfinite(logits).all()
