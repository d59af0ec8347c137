"""torchvision's segmentation models, built without any download and sized to our classes.

They return torchvision's dict: ``"out"`` holds the logits, ``"aux"`` the auxiliary head's when
built with ``aux_loss=True``.  Their state dict keys are torchvision's, so a full torchvision
segmentation state dict loads onto them with ``model.load_pretrained``.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import segmentation


def with_aux_option(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """torchvision's segmentation ``builder``, with its optional auxiliary head."""
    def build(num_classes: int, aux_loss: bool = False) -> nn.Module:
        # weights_backbone defaults to ImageNet weights in torchvision, which would download them.
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
    return build


def without_aux_option(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """torchvision's segmentation ``builder``, which has no auxiliary head."""
    def build(num_classes: int) -> nn.Module:
        return builder(weights=None, weights_backbone=None, num_classes=num_classes)
    return build


deeplabv3_resnet50 = with_aux_option(segmentation.deeplabv3_resnet50)
deeplabv3_resnet101 = with_aux_option(segmentation.deeplabv3_resnet101)
deeplabv3_mobilenet_v3_large = with_aux_option(segmentation.deeplabv3_mobilenet_v3_large)
fcn_resnet50 = with_aux_option(segmentation.fcn_resnet50)
fcn_resnet101 = with_aux_option(segmentation.fcn_resnet101)
lraspp_mobilenet_v3_large = without_aux_option(segmentation.lraspp_mobilenet_v3_large)
