"""What SMP's models offer users to choose (model/smp_models.py builds them), apart from the models:
the registry and the command line read these without importing SMP, which takes ~2 s."""
from __future__ import annotations

ENCODERS = ("mobilenet_v2", "resnet18", "resnet34", "resnet50", "vgg16_bn")
DILATABLE_ENCODERS = ("mobilenet_v2",)  # output stride 16 as DeepLab trained it (see dilate_encoder)
LOGIT_STRIDES = (1, 4)
