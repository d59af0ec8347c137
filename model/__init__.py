"""Models from checkpoints: the checkpoint ``meta`` that rebuilds a registered architecture
(model/registry.py), loading weights into it, and what every model's output holds.

Models return logits (N x C x H x W), or a torchvision-style dict whose ``"out"`` holds them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from model.registry import build_model
from utils.checkpoint import CheckpointError, load_checkpoint, load_state_dict_file
from utils.classes import IGNORE_INDEX, never_labelled_ids

NEVER_LOGIT = -1e4  # exp(-1e4 - anything real) is 0, and fp16 still holds it


def load_pretrained(model: nn.Module, path: str) -> str:
    """Copy the tensors of a local weights file into ``model`` where names and shapes match
    (a class head of another size is skipped); returns a one-line account for the log.

    Never downloads: pretrained weights reach us only as a file the user names.
    """
    state = load_state_dict_file(path)
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ValueError(f"{path}: no tensor matches the model's names and shapes")
    model.load_state_dict(matching, strict=False)
    return f"{len(matching)} of {len(own)} tensors loaded from {path}"


def build_from_meta(meta: dict) -> nn.Module:
    """The architecture a checkpoint's ``meta`` describes (weights still to be loaded)."""
    return build_model(meta["arch"], **meta["arch_args"])


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """The model a loaded checkpoint describes, with its weights; CheckpointError when the
    metadata names no buildable model or the weights do not fit it.  Classes that no
    annotation can hold (COCO's unused ids) are never predicted."""
    try:
        model = build_from_meta(checkpoint["meta"])
        model.load_state_dict(checkpoint["model"])
    except (ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"the checkpoint's metadata and weights do not make a model: {error}") from error
    never_predict(model, never_labelled_ids(checkpoint["meta"]["class_names"]))
    return model


def load_model(path: str | os.PathLike, device: torch.device) -> tuple[nn.Module, dict]:
    """A model rebuilt from a checkpoint's own metadata, in eval mode on ``device``, and that metadata."""
    checkpoint = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(checkpoint)
    return model.to(device, memory_format=torch.channels_last).eval(), checkpoint["meta"]


def never_predict(model: nn.Module, class_ids: Sequence[int]) -> None:
    """Make ``class_ids`` impossible answers of ``model``: a forward hook sets their logits to
    NEVER_LOGIT, so argmax never picks them and softmax gives them 0 (finite, so that a stray
    label of such a class costs a large loss, not an infinite one)."""
    if not class_ids:
        return
    ids = torch.tensor(list(class_ids))

    def fill(module: nn.Module, inputs: tuple, outputs: torch.Tensor | dict[str, torch.Tensor]):
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            # Exported (torch.export, ONNX) or traced (OpenVINO's converter), the in-place fill becomes
            # a scatter through reordered copies of all the logits (2.1 s of ONNX Runtime's 3.0 s on
            # the default model; 25 ms of OpenVINO's 170); a select is one pass.
            return select_never(outputs, ids)
        # In place: 10 of 91 channels written, where a masked copy would copy all the logits.
        for logits in outputs.values() if isinstance(outputs, dict) else (outputs,):
            logits.index_fill_(1, ids.to(logits.device), NEVER_LOGIT)
        return None

    model.register_forward_hook(fill)


def select_never(outputs: torch.Tensor | dict[str, torch.Tensor], ids: torch.Tensor):
    """``outputs`` with the logits of ``ids`` replaced by NEVER_LOGIT, as new tensors."""
    def masked(logits: torch.Tensor) -> torch.Tensor:
        never = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        never[ids.to(logits.device)] = True
        return torch.where(never.view(1, -1, 1, 1), NEVER_LOGIT, logits)
    return {k: masked(v) for k, v in outputs.items()} if isinstance(outputs, dict) else masked(outputs)


def main_logits(outputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of any registered model, without torchvision's auxiliary head output."""
    return outputs["out"] if isinstance(outputs, dict) else outputs


def min_input_size(model: nn.Module) -> int:
    """The smallest height and width ``model`` accepts (SegNet and the reflect-padded U-Net say
    so; the others take any size)."""
    return getattr(model, "min_input_size", 1)


def model_meta(arch: str, arch_args: dict, class_names: Sequence[str], input_size: Sequence[int],
               mean: Sequence[float], std: Sequence[float], ignore_index: int = IGNORE_INDEX) -> dict:
    """The checkpoint ``meta`` (layout in utils/checkpoint.py), as plain types for weights-only loading."""
    num_classes = arch_args["num_classes"]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of {num_classes} classes")
    return {
        "arch": arch,
        "arch_args": dict(arch_args),
        "num_classes": num_classes,
        "class_names": list(class_names),
        "input_size": [int(side) for side in input_size],
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
        "ignore_index": ignore_index,
    }
