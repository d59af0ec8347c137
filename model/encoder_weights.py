"""Pretrained weights into an encoder: from a local file, or torchvision's published ImageNet weights.

Key rule, applied to every key of the file: drop a leading ``module.`` (DataParallel), then a
leading ``backbone.`` or ``encoder.`` (segmentation models); a key that then starts with a block
number (``3.conv.0.weight``, torchvision's ``features`` stored as the backbone itself) gets
``features.`` in front.  So a torchvision classifier state dict (``features.N.*``, ``layer1.*``)
and the DeepLab VOC file (``backbone.N.*``) both land on SMP's encoders, which are torchvision's
classes.  File keys the encoder has no use for (classifier, segmentation head) are skipped;
encoder tensors the file lacks keep their initial values and are named in the log.  A tensor
whose shape differs, or a file that covers under half of the encoder, is an error: never a
silent partial load.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from utils.checkpoint import CheckpointError, load_state_dict_file
from utils.fileio import file_sha256

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
MIN_COVERED_FRACTION = 0.5
IGNORED_SUFFIXES = ("num_batches_tracked",)  # bookkeeping, not weights


class EncoderWeightsError(CheckpointError):
    """Encoder weights that cannot be had or do not fit; the message says which and why."""


@dataclass(frozen=True)
class EncoderWeightsReport:
    source: str  # file name, or "imagenet (torchvision)"
    sha256: str | None  # of the file; None for published weights
    loaded: int
    missing: list[str]  # encoder tensors the file lacks
    unused: int  # file tensors the encoder has no use for

    def as_meta(self) -> dict:
        return {"source": self.source, "sha256": self.sha256}

    def summary(self) -> str:
        missing = f"; kept their initial values: {', '.join(module_names(self.missing))}" if self.missing else ""
        return (f"encoder weights from {self.source}: {self.loaded} tensors loaded, {self.unused} of the file's "
                f"unused{missing}")


def module_names(keys: list[str]) -> list[str]:
    """``features.18.0.weight`` and its siblings, named once as ``features.18.0``."""
    return sorted({key.rsplit(".", 1)[0] for key in keys})


def encoder_key(key: str) -> str:
    """The encoder key a file key stands for, by the rule in the module docstring."""
    for prefix in ("module.", "backbone.", "encoder."):
        key = key.removeprefix(prefix)
    return f"features.{key}" if key[:1].isdigit() else key


def match_state(encoder: nn.Module, state: dict[str, torch.Tensor], source: str
                ) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """(tensors to load, encoder keys left out, file keys unused); raises on a shape mismatch."""
    own = {k: v for k, v in encoder.state_dict().items() if not k.endswith(IGNORED_SUFFIXES)}
    matched: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = encoder_key(key)
        if target not in own:
            continue
        if own[target].shape != tensor.shape:
            raise EncoderWeightsError(f"{source}: {key} has shape {tuple(tensor.shape)}, but the encoder's "
                                      f"{target} has {tuple(own[target].shape)}: weights of another network?")
        matched[target] = tensor
    if len(matched) < MIN_COVERED_FRACTION * len(own):
        example = next(iter(state), "nothing")
        raise EncoderWeightsError(f"{source} matches only {len(matched)} of the encoder's {len(own)} tensors "
                                  f"(first file key: {example}): weights of another network?")
    unused = sum(1 for key in state if encoder_key(key) not in matched and not key.endswith(IGNORED_SUFFIXES))
    return matched, [key for key in own if key not in matched], unused


def published_file(url: str) -> Path:
    """torch.hub's cached copy of ``url``, downloaded once; checked against the sha256 prefix in
    its file name (torchvision's ``name-<sha256 prefix>.pth``), whether just downloaded or found
    in the cache, where a file replaced by anyone else would otherwise be loaded as it is."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    expected = torch.hub.HASH_REGEX.search(path.name)
    if expected is None:
        raise EncoderWeightsError(f"{url} names no sha256 prefix to check the download against")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=expected[1], progress=True)  # to a temp file first
    if not file_sha256(path).startswith(expected[1]):
        raise EncoderWeightsError(f"{path} does not match the published sha256 ({expected[1]}...): delete it to "
                                  "download it again")
    return path


def imagenet_state(encoder_name: str) -> dict[str, torch.Tensor]:
    """torchvision's published ImageNet weights for ``encoder_name``: downloaded once, hash-checked,
    loaded weights-only."""
    from torchvision.models import get_model_weights  # here: only this path may touch the network

    url = get_model_weights(encoder_name).DEFAULT.url
    try:
        path = published_file(url)
    except OSError as error:  # URLError and socket errors are OSErrors
        raise EncoderWeightsError(f"cannot download the ImageNet weights of {encoder_name} ({error}); offline, "
                                  "pass a local file of them instead") from error
    except RuntimeError as error:  # torch.hub's word for a download whose hash is wrong
        raise EncoderWeightsError(f"the ImageNet weights of {encoder_name} from {url}: {error}") from error
    return load_state_dict_file(path)


def load_encoder_weights(model: nn.Module, source: str, encoder_name: str) -> EncoderWeightsReport:
    """Load ``source`` (a file path, or ``imagenet``) into ``model.encoder``; see the key rule above."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise EncoderWeightsError(f"{type(model).__name__} has no encoder that pretrained weights fill")
    if source == IMAGENET:
        state, name, digest = imagenet_state(encoder_name), f"{IMAGENET} (torchvision)", None
    else:
        state, name, digest = load_state_dict_file(source), Path(source).name, file_sha256(source)
    matched, missing, unused = match_state(encoder, state, name)
    encoder.load_state_dict(matched, strict=False)
    report = EncoderWeightsReport(name, digest, len(matched), missing, unused)
    log.info("%s", report.summary())
    return report
