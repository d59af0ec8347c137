"""The model of one worker process: loaded once (inside the worker), shared by its threads."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app import metrics
from utils.drawing import render_overlay
from utils.fileio import file_sha256
from utils.inference.predictor import Predictor
from utils.inference.summary import summarize
from utils.inference.tiling import WHOLE, Strategy


@dataclass
class Segmentation:
    classes: list[dict]
    class_map: np.ndarray  # H x W class ids at the image's size
    overlay: Image.Image
    width: int
    height: int
    inference_ms: float


class Segmenter:
    """Loads the checkpoint on first use (or ``load()`` at worker start), never at import,
    so gunicorn's parent never touches torch/CUDA before forking."""

    def __init__(self, checkpoint: str, threads: int | None = None, precision: str = "auto",
                 compiled: bool = False, device: str | None = None, backend: str = "auto") -> None:
        self.checkpoint = checkpoint
        self.backend = backend
        self.device = device
        self.threads = threads
        self.precision = precision
        self.compiled = compiled
        self._predictor: Predictor | None = None
        self.sha256: str | None = None  # of the file loaded, which a reload may have replaced since
        self._load_lock = threading.Lock()
        # One forward at a time per worker: parallel forwards would only fight over the same cores.
        self._forward_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._predictor is not None

    def load(self) -> Predictor:
        with self._load_lock:
            if self._predictor is None:
                self._predictor = Predictor.from_checkpoint(self.checkpoint, device=self.device, threads=self.threads,
                                                            precision=self.precision, compiled=self.compiled,
                                                            backend=self.backend)
                # After the load, so that a missing or broken file is the loader's one clear error.
                self.sha256 = file_sha256(self.checkpoint)
                metrics.model_loaded(self._described(self._predictor))
        return self._predictor

    def segment(self, image: Image.Image, strategy: Strategy = WHOLE) -> Segmentation:
        predictor = self.load()
        started = time.perf_counter()
        with self._forward_lock, metrics.stage("forward"):
            prediction = predictor.predict(image, strategy)
        with metrics.stage("postprocess"):
            classes = summarize(prediction, predictor.class_names)
            overlay = render_overlay(image, prediction.class_map)
        return Segmentation(classes, prediction.class_map, overlay, image.width, image.height,
                            round((time.perf_counter() - started) * 1000, 1))

    def describe(self) -> dict:
        return self._described(self.load())

    def _described(self, predictor: Predictor) -> dict:
        meta = predictor.meta
        return {"architecture": meta["arch"], "arch_args": meta["arch_args"], "checkpoint": Path(self.checkpoint).name,
                "checkpoint_sha256": self.sha256,
                "classes": meta["class_names"], "num_classes": meta["num_classes"],
                "input_size": meta["input_size"], "device": str(predictor.device), "backend": predictor.backend,
                "precision": predictor.precision,
                "metrics": meta.get("metrics", {})}
