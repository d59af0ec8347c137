"""The DeepLabV3 MobileNetV2 Pascal-VOC model of ../shared/weights, run as a teacher.

Layout (weights/SOURCE.md): ``backbone`` = torchvision ``mobilenet_v2().features[:18]`` at output
stride 16 (block 14 without its stride, blocks 15-17 dilated by 2), then an ASPP of two branches,
1x1 convolutions with biases and no BatchNorm, as TensorFlow folded them:
``a = relu(aspp0(f))``, ``p = relu(image_pooling(mean of f))`` broadcast, ``z =
relu(concat_projection([p, a]))``, ``logits(z)`` upsampled to the input with align_corners=True.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2

from model.deeplabv3plus import dilate_beyond_output_stride
from utils.checkpoint import CheckpointError, load_state_dict_file
from utils.classes import VOC_CLASSES

BACKBONE_CHANNELS = 320
ASPP_CHANNELS = 256


HEAD_KEYS = ("aspp0", "image_pooling", "concat_projection", "logits")


class VOCHead(nn.Module):
    """The 21 VOC class logits from the 320-channel block-17 features, at their resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.aspp0 = nn.Conv2d(BACKBONE_CHANNELS, ASPP_CHANNELS, 1)
        self.image_pooling = nn.Conv2d(BACKBONE_CHANNELS, ASPP_CHANNELS, 1)
        self.concat_projection = nn.Conv2d(2 * ASPP_CHANNELS, ASPP_CHANNELS, 1)
        self.logits = nn.Conv2d(ASPP_CHANNELS, len(VOC_CLASSES), 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        local = F.relu(self.aspp0(features))
        pooled = F.relu(self.image_pooling(features.mean(dim=(2, 3), keepdim=True)))
        return self.logits(F.relu(self.concat_projection(torch.cat([pooled.expand_as(local), local], dim=1))))


class DeepLabV3VOC(nn.Module):
    """21 VOC class logits at the input's resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = mobilenet_v2(weights=None).features[:18]
        dilate_beyond_output_stride(self.backbone, 16)
        self.head = VOCHead()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """The file's layout: the head's convolutions sit at the top level, beside ``backbone``."""
        nested = {f"head.{key}" if key.startswith(HEAD_KEYS) else key: value for key, value in state_dict.items()}
        return super().load_state_dict(nested, strict, assign)


def head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VOCHead tensors of a DeepLab VOC state dict."""
    return {key: value for key, value in state.items() if key.startswith(HEAD_KEYS)}


def load_voc_teacher(path: str | os.PathLike) -> DeepLabV3VOC:
    """The VOC model with the weights of ``path``, frozen in eval mode."""
    teacher = DeepLabV3VOC()
    try:
        teacher.load_state_dict(load_state_dict_file(path))
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not the DeepLabV3 MobileNetV2 VOC model: "
                              f"{str(error).splitlines()[0]}") from error
    return teacher.eval().requires_grad_(False)
