"""The building blocks of the classic U-Net (Ronneberger et al., 2015), with batch norm."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PADDING_MODES = ("zeros", "reflect")
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}  # LeakyReLU at PyTorch's slope, 0.01


@dataclass(frozen=True)
class ConvStyle:
    """How every 3x3 convolution of a U-Net pads its border and which activation follows it.
    Neither has parameters, so every style shares the state dict layout of the default one."""
    padding_mode: str = "zeros"
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding mode must be one of {', '.join(PADDING_MODES)}, got {self.padding_mode!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")

    def conv(self, in_channels: int, out_channels: int) -> nn.Conv2d:
        # No conv bias: the following BatchNorm's shift would cancel it.
        return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False,
                         padding_mode=self.padding_mode)

    def activation_layer(self) -> nn.Module:
        return ACTIVATIONS[self.activation](inplace=True)


DEFAULT_STYLE = ConvStyle()


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> activation) twice; padding keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None,
                 style: ConvStyle = DEFAULT_STYLE) -> None:
        mid_channels = mid_channels or out_channels
        super().__init__(
            style.conv(in_channels, mid_channels),
            nn.BatchNorm2d(mid_channels),
            style.activation_layer(),
            style.conv(mid_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            style.activation_layer(),
        )


class Down(nn.Sequential):
    """Halve the resolution (2x2 max pool), then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, style: ConvStyle = DEFAULT_STYLE) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, style=style))


def pad_to_match(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``tensor`` around its borders to ``reference``'s height and width.

    Pooling an odd size drops a row or column, so doubling it back can come up one short.
    """
    height_gap = reference.shape[-2] - tensor.shape[-2]
    width_gap = reference.shape[-1] - tensor.shape[-1]
    if height_gap == 0 and width_gap == 0:
        return tensor
    return F.pad(tensor, [width_gap // 2, width_gap - width_gap // 2, height_gap // 2, height_gap - height_gap // 2])


class Up(nn.Module):
    """Double the resolution, concatenate the skip connection, then DoubleConv.

    ``in_channels`` is the width after concatenation.  Bilinear mode upsamples without
    weights, so the path below must already deliver ``in_channels // 2`` channels; transposed
    mode learns the upsampling and halves the channels itself.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True,
                 style: ConvStyle = DEFAULT_STYLE) -> None:
        super().__init__()
        if bilinear:
            self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, style)
        else:
            self.upsample = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels, style=style)

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = pad_to_match(self.upsample(below), skip)
        return self.conv(torch.cat([skip, upsampled], dim=1))


class OutConv(nn.Conv2d):
    """1x1 convolution to one logit per class."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, kernel_size=1)
