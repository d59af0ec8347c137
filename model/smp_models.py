"""Encoder-decoder models from segmentation_models_pytorch (SMP) over pretrained-capable encoders.

SMP's MobileNetV2, ResNet and VGG encoders are torchvision's classes with the classifier removed,
so torchvision state dicts (and the converted files in ../shared/weights) load into ``.encoder``
(see model/encoder_weights.py).  Models are built with random weights: pretrained ones are
loaded afterwards, from a file or an explicit ``imagenet`` request, never behind the user's back.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from segmentation_models_pytorch.encoders.mobilenet import MobileNetV2Encoder
from segmentation_models_pytorch.encoders.resnet import ResNetEncoder
from segmentation_models_pytorch.encoders.vgg import VGGEncoder
from torch import nn

from model.deeplab_voc import VOCHead, head_state
from model.deeplabv3plus import dilate_beyond_output_stride
from model.pyramid_pooling import use_exportable_pyramid_pooling
from model.smp_choices import DILATABLE_ENCODERS, ENCODERS, LOGIT_STRIDES
from utils.checkpoint import CheckpointError, load_state_dict_file
from utils.classes import VOC_CLASSES, teacher_groups

MOBILENET_SPATIAL_BLOCKS = 18  # features[18] is a 1x1 convolution: nothing to dilate
PSPNET_DEPTH = 3  # SMP's PSPNet reads the encoder's third stage (stride 8)
# The U-Net decoder that stops at 1/4 of the input: three blocks, narrower than SMP's default
# (256, 128, 64), since its first block reads the encoder's widest features.
QUARTER_DECODER_CHANNELS = (128, 64, 32)


def dilate_encoder(encoder: nn.Module, output_stride: int) -> None:
    """MobileNetV2 at output stride 16 exactly as DeepLab runs it: block 14 loses its stride and
    blocks 15-17 are dilated by 2 (SMP's own ``make_dilated`` would dilate block 14 as well, which
    the DeepLab weights were not trained with)."""
    dilate_beyond_output_stride(encoder.features[:MOBILENET_SPATIAL_BLOCKS], output_stride)
    encoder._output_stride = output_stride


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad bottom/right to the next multiple of ``multiple``.  Written with floor division,
    not a negative modulo, which torch.compile's symbolic shapes cannot lower."""
    height, width = images.shape[-2:]
    padded_height = (height + multiple - 1) // multiple * multiple
    padded_width = (width + multiple - 1) // multiple * multiple
    return F.pad(images, (0, padded_width - width, 0, padded_height - height))


class AnySizeModel(nn.Module):
    """An SMP model that takes any input size: the input is zero-padded bottom/right to a multiple
    of the encoder's output stride (which SMP requires) and the logits are cropped back."""

    def __init__(self, net: nn.Module, logit_stride: int = 1) -> None:
        super().__init__()
        self.net = net
        self.logit_stride = logit_stride
        self.encoder_batchnorm_frozen = False
        self.removed_keys: frozenset[str] = frozenset()
        self.register_load_state_dict_pre_hook(drop_removed_keys)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def pretrained_parts(self) -> list[nn.Module]:
        """What pretrained weights fill: it learns at the encoder's (lower) rate."""
        return [self.encoder]

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
        padded = pad_to_multiple(images, self.encoder.output_stride)
        return self.to_input_size(self.net(padded), padded)[..., :height, :width]

    def to_input_size(self, logits: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """Logits computed at 1/logit_stride of the input, upsampled bilinearly to the padded input."""
        if self.logit_stride == 1:
            return logits
        return F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)


def drop_removed_keys(module: AnySizeModel, state_dict: dict, prefix: str, *_) -> None:
    """A load_state_dict pre-hook: state dicts saved before the model lost ``removed_keys`` still
    load strictly, because exactly those keys are dropped; any other mismatch still fails."""
    for key in module.removed_keys:
        state_dict.pop(prefix + key, None)


def drop_stages_beyond(encoder: nn.Module, depth: int) -> None:
    """Remove the encoder stages deeper than ``depth``.  SMP keeps them, and MobileNetV2 and VGG
    even run part of them before discarding the result: they cost time, and DistributedDataParallel
    waits forever for the gradients they never get."""
    if isinstance(encoder, ResNetEncoder):
        for stage in range(depth, 5):  # layer k runs only at depth k + 1 and deeper
            delattr(encoder, f"layer{stage}")
    elif isinstance(encoder, MobileNetV2Encoder):  # its first feature is the input itself
        encoder.features = encoder.features[: encoder._out_indexes[depth - 1] + 1]
    elif isinstance(encoder, VGGEncoder):
        encoder.features = encoder.features[: encoder._out_indexes[depth] + 1]
    else:
        raise ValueError(f"no rule for cutting {type(encoder).__name__} to {depth} stages")


class UNetWithVOCHead(AnySizeModel):
    """SMP's U-Net on a MobileNetV2 at output stride 16, plus DeepLab's VOC head on the encoder's
    block-17 features: its 21 class logits, mapped to this model's classes by a learnt 1x1
    convolution, are added to the U-Net's logits.

    Why: 341 images teach a fresh decoder little beyond people, while the DeepLab VOC head already
    knows 20 classes on exactly these features.  Loaded with that head and a name-to-name mapping
    (``load_voc_head``), the model starts out answering as DeepLab does for the VOC classes; the
    U-Net refines the edges and learns the classes VOC lacks.  Untrained, the mapping is zero and
    the model is a plain U-Net.
    """

    HEAD_BLOCK = 17  # the 320 channels DeepLab's head reads

    def __init__(self, net: nn.Module, num_classes: int, logit_stride: int = 1) -> None:
        super().__init__(net, logit_stride)
        self.voc_head = VOCHead()
        self.voc_to_classes = nn.Conv2d(len(VOC_CLASSES), num_classes, 1, bias=False)
        nn.init.zeros_(self.voc_to_classes.weight)

    def pretrained_parts(self) -> list[nn.Module]:
        return [self.encoder, self.voc_head]

    def encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The U-Net's encoder features (SMP's order) and the head's block-17 features, in one pass."""
        features, head_features = [images], images
        for index, block in enumerate(self.encoder.features):
            images = block(images)
            if index in self.encoder._out_indexes:  # SMP's taps: strides 2, 4, 8, 16 and the last block
                features.append(images)
            if index == self.HEAD_BLOCK:
                head_features = images
        return features, head_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        padded = pad_to_multiple(images, self.encoder.output_stride)
        features, head_features = self.encode(padded)
        logits = self.net.segmentation_head(self.net.decoder(features))
        prior = self.voc_to_classes(self.voc_head(head_features))
        prior = F.interpolate(prior, size=logits.shape[-2:], mode="bilinear", align_corners=True)
        return self.to_input_size(logits + prior, padded)[..., :height, :width]


def load_voc_head(model: UNetWithVOCHead, path: str | os.PathLike, class_names: Sequence[str]) -> str:
    """DeepLab's VOC head from ``path`` into ``model.voc_head``, and each VOC class's logit passed
    to the model's class of the same name (VOC spellings mapped to COCO's); returns a log line."""
    try:
        model.voc_head.load_state_dict(head_state(load_state_dict_file(path)))
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not the DeepLabV3 MobileNetV2 VOC model: "
                              f"{str(error).splitlines()[0]}") from error
    try:
        groups = teacher_groups(VOC_CLASSES, class_names)
    except ValueError as error:
        raise ValueError("none of the dataset's classes is a VOC class, so the VOC head "
                         "would add nothing") from error
    with torch.no_grad():
        model.voc_to_classes.weight.zero_()
        for class_index, voc_index in enumerate(groups):
            if voc_index or class_index == 0:
                model.voc_to_classes.weight[class_index, voc_index] = 1.0
    mapped = sum(1 for voc_index in groups if voc_index)
    return f"VOC head from {Path(path).name}: {mapped} classes take DeepLab's logits of the same name"


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


def smp_unet(num_classes: int, encoder: str = "mobilenet_v2", encoder_output_stride: int = 32,
             voc_head: bool = False, logit_stride: int = 1) -> AnySizeModel:
    """SMP's U-Net over ``encoder``; ``encoder_output_stride`` 16 keeps MobileNetV2's last blocks at
    1/16 of the input, dilated, as the DeepLab weights expect (the decoder then skips one upsampling);
    ``voc_head`` adds DeepLab's VOC head (UNetWithVOCHead), for MobileNetV2 at stride 16 only;
    ``logit_stride`` 4 stops the decoder at 1/4 of the input (stop_decoder_at_quarter)."""
    if voc_head and (encoder, encoder_output_stride) != ("mobilenet_v2", 16):
        raise ValueError(f"the VOC head reads MobileNetV2 at output stride 16, not {encoder} at "
                         f"{encoder_output_stride}")
    if logit_stride not in LOGIT_STRIDES:
        raise ValueError(f"logit stride must be one of {LOGIT_STRIDES}, got {logit_stride}")
    net = over_encoder(smp.Unet, num_classes, encoder, encoder_output_stride).net
    if logit_stride == 4:
        stop_decoder_at_quarter(net, num_classes)
    return UNetWithVOCHead(net, num_classes, logit_stride) if voc_head else AnySizeModel(net, logit_stride)


def stop_decoder_at_quarter(net: smp.Unet, num_classes: int) -> None:
    """Keep the decoder's first three blocks (down to the stride-4 skip) and put the class head there:
    the two full- and half-resolution blocks and a 3x3 head at full resolution are three quarters
    of a MobileNetV2 U-Net's FLOPs, while bilinear logits from 1/4 are what DeepLabV3+ serves."""
    if isinstance(net.encoder, MobileNetV2Encoder):
        drop_mobilenet_expansion(net.encoder)
    net.decoder = UnetDecoder(net.encoder.out_channels, QUARTER_DECODER_CHANNELS,
                              n_blocks=len(QUARTER_DECODER_CHANNELS))
    net.segmentation_head = SegmentationHead(QUARTER_DECODER_CHANNELS[-1], num_classes, kernel_size=3)


def drop_mobilenet_expansion(encoder: MobileNetV2Encoder) -> None:
    """The decoder reads block 17's 320 channels, not block 18's 1x1 expansion to 1280: that layer
    feeds ImageNet's classifier (DeepLab's weights do not have it), and the first decoder block
    reading 1280 + 96 channels would cost a quarter of the model's FLOPs."""
    encoder.features = encoder.features[:MOBILENET_SPATIAL_BLOCKS]
    encoder._out_indexes[-1] = MOBILENET_SPATIAL_BLOCKS - 1
    encoder._out_channels = [*encoder._out_channels[:-1], encoder.features[-1].conv[-1].num_features]


def smp_fpn(num_classes: int, encoder: str = "mobilenet_v2") -> AnySizeModel:
    """SMP's feature pyramid network over ``encoder`` (stride 32: its top-down path doubles each level)."""
    return over_encoder(smp.FPN, num_classes, encoder)


def smp_pspnet(num_classes: int, encoder: str = "mobilenet_v2") -> AnySizeModel:
    """SMP's PSPNet over ``encoder``'s first three stages (a stride-8 map), pyramid-pooled and
    upsampled by 8; inputs are padded to a multiple of 8.  Its pyramid pooling is rewritten so
    that the ONNX export is right at every size (model/pyramid_pooling.py).  The deeper stages are
    not kept; checkpoints saved with them still load."""
    model = over_encoder(smp.PSPNet, num_classes, encoder, encoder_depth=PSPNET_DEPTH)
    use_exportable_pyramid_pooling(model.net)
    before = set(model.state_dict())
    drop_stages_beyond(model.encoder, PSPNET_DEPTH)
    model.removed_keys = frozenset(before - set(model.state_dict()))
    return model


XCEPTION = "tu-xception65"  # timm's aligned Xception-65, the DeepLabV3+ paper's backbone


def deeplabv3plus_xception(num_classes: int, output_stride: int = 16) -> AnySizeModel:
    """SMP's DeepLabV3+ on timm's aligned Xception-65, randomly initialised (nothing downloaded);
    ``output_stride`` 8 or 16 as in the paper."""
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    return AnySizeModel(smp.DeepLabV3Plus(encoder_name=XCEPTION, encoder_weights=None,
                                          encoder_output_stride=output_stride, classes=num_classes))
