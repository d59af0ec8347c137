"""PSPNet's pyramid pooling (model/pyramid_pooling.py) against PyTorch's and SMP's own."""
from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from model import build_model
from model.pyramid_pooling import AdaptiveAvgPool, PyramidPoolingBlock


@pytest.mark.parametrize("height, width", [(1, 1), (2, 2), (5, 7), (13, 9), (40, 33)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_matrix_pooling_equals_adaptive_average_pooling(height, width, bins):
    """Maps smaller than the bins too: PyTorch's windows then overlap, and so must ours."""
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * 100 + width))
    torch.testing.assert_close(AdaptiveAvgPool(bins)(x), nn.AdaptiveAvgPool2d(bins)(x))


def test_the_pspnet_equals_smps_own_with_the_same_weights():
    torch.manual_seed(0)
    ours = build_model("smp_pspnet", num_classes=3).eval()
    theirs = smp.PSPNet(encoder_name="mobilenet_v2", encoder_weights=None, classes=3).eval()
    # Same keys (the blocks keep SMP's layer names), less the encoder stages PSPNet never reads.
    assert theirs.load_state_dict(ours.net.state_dict(), strict=False).unexpected_keys == []
    assert {f"net.{key}" for key in set(theirs.state_dict()) - set(ours.net.state_dict())} == ours.removed_keys
    assert all(isinstance(block, PyramidPoolingBlock) for block in ours.net.decoder.psp.blocks)
    images = torch.randn(1, 3, 96, 72)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), atol=1e-5, rtol=1e-5)


def test_the_pooling_stays_float32_under_bf16_autocast():
    x = torch.randn(1, 4, 29, 31, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = AdaptiveAvgPool(6)(x)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, nn.AdaptiveAvgPool2d(6)(x))
