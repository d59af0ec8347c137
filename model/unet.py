"""The classic U-Net: four poolings down, four upsamplings back with skip connections."""
from __future__ import annotations

import torch
from torch import nn

from model.unet_parts import ConvStyle, DoubleConv, Down, OutConv, Up


class UNet(nn.Module):
    """Per-pixel class logits (N x num_classes x H x W) at the input's resolution.

    Any input of at least 16x16 pixels works, odd sizes included.  With ``bilinear`` the
    bottom block has half the channels, as the weight-free upsampling cannot reduce them.
    ``padding_mode`` (``zeros`` or ``reflect``) and ``activation`` (``relu`` or ``leaky_relu``)
    apply to every 3x3 convolution; ``dropout`` is the drop probability of the bottleneck's
    features, as at the end of the original U-Net's contracting path.  None of the three has
    parameters, so checkpoints written before they existed still load.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 91, base_width: int = 64,
                 bilinear: bool = True, padding_mode: str = "zeros", dropout: float = 0.0,
                 activation: str = "relu") -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        style = ConvStyle(padding_mode, activation)
        widths = [base_width * 2**level for level in range(5)]
        halving = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, widths[0], style=style)
        self.downs = nn.ModuleList([
            Down(widths[0], widths[1], style),
            Down(widths[1], widths[2], style),
            Down(widths[2], widths[3], style),
            Down(widths[3], widths[4] // halving, style),
        ])
        self.bottleneck_dropout = nn.Dropout(dropout)
        self.ups = nn.ModuleList([
            Up(widths[4], widths[3] // halving, bilinear, style),
            Up(widths[3], widths[2] // halving, bilinear, style),
            Up(widths[2], widths[1] // halving, bilinear, style),
            Up(widths[1], widths[0], bilinear, style),
        ])
        self.outc = OutConv(widths[0], num_classes)
        # Reflection needs a neighbour to mirror: the bottleneck map must be 2 pixels, not 1.
        self.min_input_size = 2 ** len(self.downs) * (2 if padding_mode == "reflect" else 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if min(images.shape[-2:]) < self.min_input_size:
            # Otherwise the last pooling fails with an obscure "output size is too small".
            raise ValueError(f"UNet needs inputs of at least {self.min_input_size}x{self.min_input_size} "
                             f"pixels, got {tuple(images.shape[-2:])}")
        skips = [self.inc(images)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        features = self.bottleneck_dropout(skips.pop())
        for up in self.ups:
            features = up(features, skips.pop())
        return self.outc(features)
