"""DeepLabV3+ (Chen et al., 2018) on torchvision's MobileNetV2: a dilated backbone, ASPP, and a
decoder that sharpens the ASPP output with the stride-4 features.

The backbone is stored as ``features`` with torchvision's block numbering, so the state dict of a
``torchvision.models.mobilenet_v2`` (keys ``features.N.*``) loads onto it with ``load_pretrained``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # the paper's rates; OS 8 doubles them for the doubled map
LOW_LEVEL_BLOCKS = 4  # features[:4] end at stride 4
ASPP_CHANNELS = 256
SKIP_CHANNELS = 48


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def spatial_conv(block: nn.Module) -> nn.Conv2d:
    """The one 3x3 convolution of a MobileNetV2 block (the stem conv or the depthwise conv)."""
    (conv,) = [module for module in block.modules() if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)]
    return conv


def dilate_beyond_output_stride(blocks: nn.Sequential, output_stride: int) -> None:
    """Keep the feature map at 1/``output_stride`` of the input: each stride 2 past that point becomes
    stride 1, and the 3x3 convolutions after it are dilated instead, so the receptive field grows as
    in the pretrained network.  The block that loses its stride keeps the dilation before it."""
    stride, dilation = 1, 1
    for block in blocks:
        conv = spatial_conv(block)
        block_dilation = dilation
        if conv.stride == (2, 2):
            if stride == output_stride:
                conv.stride = (1, 1)
                dilation *= 2
            else:
                stride *= 2
        conv.dilation = conv.padding = (block_dilation, block_dilation)


class ImagePooling(nn.Module):
    """ASPP's image-level branch.  No BatchNorm after the global pooling: with one image per batch
    it would normalise single values and fail in training mode."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1),
                                     nn.ReLU(inplace=True))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(features).expand(-1, -1, *features.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches and image pooling."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([
            conv_bn_relu(in_channels, out_channels),
            *(conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates),
            ImagePooling(in_channels, out_channels),
        ])
        self.project = nn.Sequential(conv_bn_relu(len(self.branches) * out_channels, out_channels),
                                     nn.Dropout(0.1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(features) for branch in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """Per-pixel class logits (N x num_classes x H x W) at the input's resolution, any input size.

    ``output_stride`` (8 or 16) is the backbone's resolution relative to the input: 8 gives the
    ASPP a map twice as fine, at a higher cost in the backbone's last blocks and the ASPP.
    """

    def __init__(self, num_classes: int, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"output_stride must be one of {sorted(ASPP_RATES)}, got {output_stride}")
        # The final 1x1 conv to 1280 channels is dropped, as in the paper: ASPP reads the 320 channels.
        self.features = mobilenet_v2(weights=None).features[:-1]
        dilate_beyond_output_stride(self.features, output_stride)
        self.aspp = ASPP(self.features[-1].out_channels, ASPP_CHANNELS, ASPP_RATES[output_stride])
        self.skip = conv_bn_relu(self.features[LOW_LEVEL_BLOCKS - 1].out_channels, SKIP_CHANNELS)
        self.decoder = nn.Sequential(
            conv_bn_relu(ASPP_CHANNELS + SKIP_CHANNELS, ASPP_CHANNELS, 3),
            conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS, 3),
            nn.Conv2d(ASPP_CHANNELS, num_classes, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        low_level = self.features[:LOW_LEVEL_BLOCKS](images)
        context = self.aspp(self.features[LOW_LEVEL_BLOCKS:](low_level))
        context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.decoder(torch.cat([context, self.skip(low_level)], dim=1))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
