"""The classic U-Net: four poolings down, four upsamplings back with skip connections."""
from __future__ import annotations

import torch
from torch import nn

from model.unet_parts import DoubleConv, Down, OutConv, Up


class UNet(nn.Module):
    """Per-pixel class logits (N x num_classes x H x W) at the input's resolution.

    Any input of at least 16x16 pixels works, odd sizes included.  With ``bilinear`` the
    bottom block has half the channels, as the weight-free upsampling cannot reduce them.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 91, base_width: int = 64,
                 bilinear: bool = True) -> None:
        super().__init__()
        widths = [base_width * 2**level for level in range(5)]
        halving = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList([
            Down(widths[0], widths[1]),
            Down(widths[1], widths[2]),
            Down(widths[2], widths[3]),
            Down(widths[3], widths[4] // halving),
        ])
        self.ups = nn.ModuleList([
            Up(widths[4], widths[3] // halving, bilinear),
            Up(widths[3], widths[2] // halving, bilinear),
            Up(widths[2], widths[1] // halving, bilinear),
            Up(widths[1], widths[0], bilinear),
        ])
        self.outc = OutConv(widths[0], num_classes)

    @property
    def min_input_size(self) -> int:
        return 2 ** len(self.downs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if min(images.shape[-2:]) < self.min_input_size:
            # Otherwise the last pooling fails with an obscure "output size is too small".
            raise ValueError(f"UNet needs inputs of at least {self.min_input_size}x{self.min_input_size} "
                             f"pixels, got {tuple(images.shape[-2:])}")
        skips = [self.inc(images)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        features = skips.pop()
        for up in self.ups:
            features = up(features, skips.pop())
        return self.outc(features)
