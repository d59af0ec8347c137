"""Every architecture by name: how to build it, the arguments a user may choose, and the facts that
training must respect.  Adding an architecture is one entry in ARCHITECTURES; the training options
(utils/training/options.py) are made from these entries.

An entry names its builder as ``"module:callable"``, imported on first use: a process pays only
for the libraries of the networks it builds (torchvision and SMP take ~2 s to import, and every
service worker and script starts by importing this registry).
"""
from __future__ import annotations

import importlib
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from model.smp_choices import ENCODERS, LOGIT_STRIDES
from model.unet_parts import ACTIVATIONS, PADDING_MODES


@dataclass(frozen=True)
class Argument:
    """A constructor argument users choose.  Users choose it by ``name``; the constructor receives
    ``convert(value)`` as ``keyword`` (by default the value itself, as ``name``)."""
    name: str
    default: Any
    help: str
    choices: tuple | None = None
    metavar: str | None = None
    keyword: str | None = None
    convert: Callable[[Any], Any] | None = None
    # False for arguments added after checkpoints were written: at their default they stay out of
    # the recorded arguments, so those runs still resume with the same ones.
    recorded_at_default: bool = True

    def constructor_arguments(self, value: Any) -> dict:
        """What the constructor receives (and the checkpoint records) for the chosen ``value``."""
        if value == self.default and not self.recorded_at_default:
            return {}
        return {self.keyword or self.name: self.convert(value) if self.convert else value}


@dataclass(frozen=True)
class Architecture:
    builder: str  # "module:callable"
    arguments: tuple[Argument, ...] = ()
    # An encoder that pretrained classifier weights fill (model/encoder_weights.py), and that
    # can be frozen while the decoder learns.
    pretrained_encoder: bool = False
    # BatchNorm after a global pooling sees one value per image: a batch of one cannot train it.
    batchnorm_after_pooling: bool = False

    @property
    def build(self) -> Callable[..., nn.Module]:
        module, name = self.builder.split(":")
        return getattr(importlib.import_module(module), name)


BASE_WIDTH = Argument("base_width", 64, "channels of the first level, doubled at each level down (64 = VGG16)")
ENCODER = Argument("encoder", "mobilenet_v2", "the encoder network", choices=ENCODERS)
OUTPUT_STRIDE = Argument("output_stride", 16, "DeepLabV3+: 8 or 16", choices=(8, 16))
AUX_LOSS = Argument("aux_loss", False, "add torchvision's auxiliary head (its loss counts half)")

UNET_ARGUMENTS = (
    BASE_WIDTH,
    Argument("transposed", False, "transposed convolutions, not bilinear", keyword="bilinear",
             convert=operator.not_),
    Argument("padding_mode", "zeros", "border of every 3x3 convolution: zeros, or reflect (mirrors the image)",
             choices=PADDING_MODES, recorded_at_default=False),
    Argument("dropout", 0.0, "drop probability at the bottleneck", recorded_at_default=False),
    Argument("activation", "relu", "relu, or leaky_relu (slope 0.01)", choices=tuple(ACTIVATIONS),
             recorded_at_default=False),
)
SMP_UNET_ARGUMENTS = (
    ENCODER,
    Argument("encoder_output_stride", 32, "16: MobileNetV2's last blocks dilated, as DeepLab trained them "
                                          "(use with its weights)", choices=(16, 32)),
    Argument("voc_head", None, "add DeepLab's VOC head from this DeepLabV3 MobileNetV2 VOC file (needs "
                               "mobilenet_v2 at output stride 16): its 21 class logits feed the classes of "
                               "the same names", metavar="FILE", convert=bool, recorded_at_default=False),
    Argument("logit_stride", 1, "1: the decoder runs to full resolution; 4: it stops at 1/4 of the input and "
                                "the logits are upsampled bilinearly (MobileNetV2: a quarter of the FLOPs)",
             choices=LOGIT_STRIDES, recorded_at_default=False),
)

ARCHITECTURES: dict[str, Architecture] = {
    "unet": Architecture("model.unet:UNet", UNET_ARGUMENTS),
    "segnet": Architecture("model.segnet:SegNet", (BASE_WIDTH,)),
    "smp_unet": Architecture("model.smp_models:smp_unet", SMP_UNET_ARGUMENTS, pretrained_encoder=True),
    "smp_fpn": Architecture("model.smp_models:smp_fpn", (ENCODER,), pretrained_encoder=True),
    "smp_pspnet": Architecture("model.smp_models:smp_pspnet", (ENCODER,), pretrained_encoder=True),
    "deeplabv3plus_mobilenetv2": Architecture("model.deeplabv3plus:DeepLabV3Plus", (OUTPUT_STRIDE,)),
    "deeplabv3plus_xception": Architecture("model.smp_models:deeplabv3plus_xception", (OUTPUT_STRIDE,),
                                           batchnorm_after_pooling=True),
    "deeplabv3_resnet50": Architecture("model.torchvision_models:deeplabv3_resnet50", (AUX_LOSS,),
                                       batchnorm_after_pooling=True),
    "deeplabv3_resnet101": Architecture("model.torchvision_models:deeplabv3_resnet101", (AUX_LOSS,),
                                        batchnorm_after_pooling=True),
    "deeplabv3_mobilenet_v3_large": Architecture("model.torchvision_models:deeplabv3_mobilenet_v3_large",
                                                 (AUX_LOSS,), batchnorm_after_pooling=True),
    "fcn_resnet50": Architecture("model.torchvision_models:fcn_resnet50", (AUX_LOSS,)),
    "fcn_resnet101": Architecture("model.torchvision_models:fcn_resnet101", (AUX_LOSS,)),
    "lraspp_mobilenet_v3_large": Architecture("model.torchvision_models:lraspp_mobilenet_v3_large"),
}


def architecture(arch: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model {arch!r}; known models: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]


def build_model(arch: str, **arch_args) -> nn.Module:
    """A freshly initialised ``arch`` built with ``arch_args`` (which include ``num_classes``)."""
    return architecture(arch).build(**arch_args)
