"""Encoder-decoder models from segmentation_models_pytorch (SMP) over pretrained-capable encoders.

SMP's MobileNetV2, ResNet and VGG encoders are torchvision's classes with the classifier removed,
so torchvision state dicts (and the converted files in ../shared/weights) load into ``.encoder``
(see model/encoder_weights.py).  Models are built with random weights: pretrained ones are
loaded afterwards, from a file or an explicit ``imagenet`` request, never behind the user's back.
"""
from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from model.deeplabv3plus import dilate_beyond_output_stride

ENCODERS = ("mobilenet_v2", "resnet18", "resnet34", "resnet50", "vgg16_bn")
DILATABLE_ENCODERS = ("mobilenet_v2",)  # output stride 16 as DeepLab trained it (see dilate_encoder)
MOBILENET_SPATIAL_BLOCKS = 18  # features[18] is a 1x1 convolution: nothing to dilate


def dilate_encoder(encoder: nn.Module, output_stride: int) -> None:
    """MobileNetV2 at output stride 16 exactly as DeepLab runs it: block 14 loses its stride and
    blocks 15-17 are dilated by 2 (SMP's own ``make_dilated`` would dilate block 14 as well, which
    the DeepLab weights were not trained with)."""
    dilate_beyond_output_stride(encoder.features[:MOBILENET_SPATIAL_BLOCKS], output_stride)
    encoder._output_stride = output_stride


class AnySizeModel(nn.Module):
    """An SMP model that takes any input size: the input is zero-padded bottom/right to a multiple
    of the encoder's output stride (which SMP requires) and the logits are cropped back."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.encoder_batchnorm_frozen = False

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def freeze_encoder_batchnorm(self) -> None:
        """Keep the encoder's BatchNorm statistics (the pretrained ones) in training too: batches of
        a few crops estimate them worse than the millions of pixels they were measured on."""
        self.encoder_batchnorm_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> AnySizeModel:
        super().train(mode)
        if mode and self.encoder_batchnorm_frozen:
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        multiple = self.net.encoder.output_stride
        pad_bottom, pad_right = -height % multiple, -width % multiple
        logits = self.net(F.pad(images, (0, pad_right, 0, pad_bottom)))
        return logits[..., :height, :width]


def check_encoder(encoder: str, output_stride: int) -> None:
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; known encoders: {', '.join(ENCODERS)}")
    if output_stride != 32 and encoder not in DILATABLE_ENCODERS:
        raise ValueError(f"encoder output stride {output_stride} is offered for {', '.join(DILATABLE_ENCODERS)} "
                         f"only; {encoder} runs at 32")
    if output_stride not in (16, 32):
        raise ValueError(f"encoder output stride must be 16 or 32, got {output_stride}")


def smp_unet(num_classes: int, encoder: str = "mobilenet_v2", encoder_output_stride: int = 32) -> AnySizeModel:
    """SMP's U-Net over ``encoder``; ``encoder_output_stride`` 16 keeps MobileNetV2's last blocks at
    1/16 of the input, dilated, as the DeepLab weights expect (the decoder then skips one upsampling)."""
    check_encoder(encoder, encoder_output_stride)
    net = smp.Unet(encoder_name=encoder, encoder_weights=None, classes=num_classes)
    if encoder_output_stride != 32:
        dilate_encoder(net.encoder, encoder_output_stride)
    return AnySizeModel(net)
