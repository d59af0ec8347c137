"""SegNet (Badrinarayanan et al., 2017): a VGG16-style encoder, and a decoder that puts each value
back where the encoder's max pooling found it (its indices) before convolving the sparse map.

No well-kept library ships SegNet, so it is written here from small named blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from model.deeplabv3plus import conv_bn_relu

VGG16_STAGES = ((1, 2), (2, 2), (4, 3), (8, 3), (8, 3))  # (width as a multiple of base_width, 3x3 convs)


class EncoderStage(nn.Module):
    """3x3 convolutions, then a 2x2 max pool that also returns where each maximum was."""

    def __init__(self, in_channels: int, out_channels: int, convs: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(conv_bn_relu(in_channels if i == 0 else out_channels, out_channels, 3)
                                     for i in range(convs)))
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        features = self.convs(features)
        pooled, indices = self.pool(features)
        return pooled, indices, features.shape


class DecoderStage(nn.Module):
    """Max unpooling with the mirrored encoder stage's indices (to its exact size, so odd sizes come
    back whole), then 3x3 convolutions, the last one narrowing to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, convs: int) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(2)
        self.convs = nn.Sequential(*(conv_bn_relu(in_channels, out_channels if i == convs - 1 else in_channels, 3)
                                     for i in range(convs)))

    def forward(self, features: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.convs(self.unpool(features, indices, output_size=size))


class SegNet(nn.Module):
    """Per-pixel class logits (N x num_classes x H x W) at the input's resolution, for any input of
    at least 32x32 pixels; ``base_width`` 64 is VGG16's."""

    def __init__(self, num_classes: int, base_width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        widths = [base_width * multiple for multiple, _ in VGG16_STAGES]
        convs = [count for _, count in VGG16_STAGES]
        self.encoder = nn.ModuleList(EncoderStage(width_in, width, count) for width_in, width, count
                                     in zip([in_channels, *widths[:-1]], widths, convs, strict=True))
        # The decoder mirrors the encoder: deepest stage first, each narrowing to the stage above's width.
        self.decoder = nn.ModuleList(DecoderStage(width, width_out, count) for width, width_out, count
                                     in zip(widths[::-1], [*widths[-2::-1], widths[0]], convs[::-1], strict=True))
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=3, padding=1)
        self.min_input_size = 2 ** len(self.encoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if min(images.shape[-2:]) < self.min_input_size:
            raise ValueError(f"SegNet needs inputs of at least {self.min_input_size}x{self.min_input_size} "
                             f"pixels, got {tuple(images.shape[-2:])}")
        features, pooled = images, []
        for stage in self.encoder:
            features, indices, size = stage(features)
            pooled.append((indices, size))
        for stage in self.decoder:
            features = stage(features, *pooled.pop())
        return self.classifier(features)
