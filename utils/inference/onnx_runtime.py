"""ONNX Runtime behind the Predictor (SEG_BACKEND=onnxruntime): the graph tools/export_onnx.py wrote
beside the checkpoint (``model.pth`` -> ``model.onnx``) when its metadata names the checkpoint's
sha256, else the checkpoint exported now, in memory (nothing is written: the command writes the file).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from model.export_onnx import CHECKPOINT_KEY, export_onnx, onnxruntime_session
from utils.fileio import file_sha256

log = logging.getLogger(__name__)


def exported_file(checkpoint: str | os.PathLike) -> Path:
    """Where tools/export_onnx.py writes ``checkpoint``'s graph by default, and where the backend looks."""
    return Path(checkpoint).with_suffix(".onnx")


def checkpoint_session(checkpoint: str | os.PathLike, model: nn.Module, threads: int | None = None):
    """An ONNX Runtime session of ``checkpoint``'s ``model``: from its exported_file when that file
    names the checkpoint's sha256, else exported now, with a log line when a file was there."""
    path = exported_file(checkpoint)
    if path.is_file():
        try:
            session = onnxruntime_session(path, threads)
        # ONNX Runtime's errors (InvalidProtobuf, NoSuchFile, NotImplemented for an op it lacks, ...)
        # derive from Exception alone; whichever it is, exporting again gives a graph that runs.
        except Exception as error:
            reason = f"is unreadable here ({str(error).splitlines()[0]})"
        else:
            if session.get_modelmeta().custom_metadata_map.get(CHECKPOINT_KEY) == file_sha256(checkpoint):
                return session
            reason = "was not exported from it"
        log.warning("%s %s: exporting %s at every start until tools/export_onnx.py writes it again",
                    path, reason, checkpoint)
    return onnxruntime_session(export_onnx(model), threads)
