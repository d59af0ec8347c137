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


def over_encoder(architecture: type[nn.Module], num_classes: int, encoder: str, encoder_output_stride: int = 32,
                 **options) -> AnySizeModel:
    """SMP's ``architecture`` over one of ENCODERS, randomly initialised, taking any input size."""
    check_encoder(encoder, encoder_output_stride)
    net = architecture(encoder_name=encoder, encoder_weights=None, classes=num_classes, **options)
    if encoder_output_stride != 32:
        dilate_encoder(net.encoder, encoder_output_stride)
    return AnySizeModel(net)


def smp_unet(num_classes: int, encoder: str = "mobilenet_v2", encoder_output_stride: int = 32) -> AnySizeModel:
    """SMP's U-Net over ``encoder``; ``encoder_output_stride`` 16 keeps MobileNetV2's last blocks at
    1/16 of the input, dilated, as the DeepLab weights expect (the decoder then skips one upsampling)."""
    return over_encoder(smp.Unet, num_classes, encoder, encoder_output_stride)


def smp_fpn(num_classes: int, encoder: str = "mobilenet_v2") -> AnySizeModel:
    """SMP's feature pyramid network over ``encoder`` (stride 32: its top-down path doubles each level)."""
    return over_encoder(smp.FPN, num_classes, encoder)


def smp_pspnet(num_classes: int, encoder: str = "mobilenet_v2") -> AnySizeModel:
    """SMP's PSPNet over ``encoder``'s first three stages (a stride-8 map), pyramid-pooled and
    upsampled by 8; inputs are padded to a multiple of 8."""
    return over_encoder(smp.PSPNet, num_classes, encoder)


XCEPTION = "tu-xception65"  # timm's aligned Xception-65, the DeepLabV3+ paper's backbone


def deeplabv3plus_xception(num_classes: int, output_stride: int = 16) -> AnySizeModel:
    """SMP's DeepLabV3+ on timm's aligned Xception-65, randomly initialised (nothing downloaded);
    ``output_stride`` 8 or 16 as in the paper."""
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    return AnySizeModel(smp.DeepLabV3Plus(encoder_name=XCEPTION, encoder_weights=None,
                                          encoder_output_stride=output_stride, classes=num_classes))
