"""PSPNet's pyramid pooling written so that one ONNX graph is right at every input size.

torch.onnx fixes ``nn.AdaptiveAvgPool2d``'s windows at the size it traced (and SMP's own export
path, ``F.interpolate(mode="area")``, is the same operator), so an exported PSPNet is exact only at
that size and fails on maps smaller than the number of bins.  Adaptive average pooling is a
product with two averaging matrices whose windows follow PyTorch's rule (bin i of n over a length L
covers [floor(i L / n), ceil((i + 1) L / n))); built from the input's shape, they export as shape
arithmetic and give the same numbers as PyTorch at any size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def averaging_matrix(length: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """bins x length: row i averages PyTorch's adaptive window i."""
    index = torch.arange(bins, device=like.device)
    start = index * length // bins
    end = ((index + 1) * length + bins - 1) // bins
    position = torch.arange(length, device=like.device)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d((bins, bins))`` as two matrix products (see the module's docstring)."""

    def __init__(self, bins: int) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # In float32 even under autocast: weights like 1/7 rounded to bf16 would triple the error
        # of PyTorch's own pooling.
        with torch.autocast(x.device.type, enabled=False):
            planes = x.float()
            rows = averaging_matrix(height, self.bins, planes)
            columns = averaging_matrix(width, self.bins, planes)
            return torch.einsum("ih,nchw,jw->ncij", rows, planes, columns).to(x.dtype)


class PyramidPoolingBlock(nn.Module):
    """One level of SMP's pyramid: pool to bins x bins, its 1x1 convolution, upsample back.
    Holds the same ``pool`` layers as SMP's PSPBlock, so state dicts are interchangeable."""

    def __init__(self, smp_block: nn.Module) -> None:
        super().__init__()
        self.pool = nn.Sequential(AdaptiveAvgPool(smp_block.pool_size), smp_block.pool[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=True)


def use_exportable_pyramid_pooling(pspnet: nn.Module) -> None:
    """Replace the blocks of an SMP PSPNet's pyramid with PyramidPoolingBlock, in place."""
    blocks = pspnet.decoder.psp.blocks
    for index, block in enumerate(blocks):
        blocks[index] = PyramidPoolingBlock(block)
