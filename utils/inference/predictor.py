"""The one inference path: checkpoint in, per-pixel classes and confidences out.

The web app, test_draw.py and predict.py all go through ``Predictor.predict`` so that an
image is decoded, resized, normalised and decoded back in exactly one way.

How the network runs (``Predictor.from_checkpoint`` options): always in channels_last memory;
in fp32, or under bf16 autocast (CPUs with native bf16) / fp16 autocast (CUDA) when
``precision="auto"`` and the checkpoint's accuracy guard passed for that dtype on that device
(``<checkpoint>.guard.json``, written by tools/guard_precision.py), or when ``precision="bf16"``
or ``"fp16"`` (CUDA) asks for it.  ``compiled=True``
adds torch.compile, compiled during loading; ``backend="onnxruntime"`` runs the exported ONNX
graph instead (CPU, fp32), ``backend="openvino"`` the checkpoint's cached OpenVINO IR (CPU: fp32,
or int8 / bf16 where their guard verdicts passed; utils/inference/openvino_runtime.py).
bench/infer.py times each of these.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model import main_logits, min_input_size, model_from_checkpoint
from model.export_onnx import run_session
from utils.checkpoint import load_checkpoint
from utils.data.transforms import SIZE_MULTIPLE, normalise, padded_size, to_unit_range
from utils.fileio import to_rgb
from utils.inference.onnx_runtime import checkpoint_session
from utils.inference.openvino_runtime import OpenVINOForward, openvino_model
from utils.inference.precision_guard import precision_allowed
from utils.inference.tiling import WHOLE, Forward, Strategy, TileProbabilities, scaled_size, slide, tta_probabilities
from utils.precision import cpu_supports_bf16

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
SERVING_BACKENDS = ("auto", *BACKENDS)  # auto: Predictor.on_the_fastest
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What the Predictor and the service run in; "auto" is the guarded choice of choose_precision and
# openvino_model (not training autocast's "auto"); fp16 runs on CUDA only, int8 on OpenVINO only.
SERVING_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
PIXELS_PER_CHUNK = 4096  # softmax rows per step: 91 classes x 4096 x 4 bytes = 1.5 MB, about one core's L2


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """``prefer`` when given, else CUDA when available, else the CPU."""
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_precision(requested: str, device: torch.device, guard_passed: Callable[[str], bool]) -> str:
    """"fp32", "bf16" or "fp16": what the network runs in for ``requested`` (one of SERVING_PRECISIONS).

    "auto" takes the reduced precision of the hardware (fp16 on CUDA, bf16 on CPUs with native
    bf16) only when ``guard_passed(that dtype)``: the checkpoint's comparison of fp32 with that
    very dtype, on this kind of device, allowed it.  The CPU never runs bf16 without native
    support, where it is emulated and slower than fp32.
    """
    if requested == "fp32":
        return "fp32"
    if requested == "int8":
        raise ValueError("int8 runs on OpenVINO only (backend auto or openvino, on the CPU)")
    if requested == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 runs on CUDA only; on the CPU use bf16 or fp32")
        return "fp16"
    native = device.type == "cuda" or cpu_supports_bf16()
    if not native:
        if requested == "bf16":
            log.warning("bf16 requested, but this CPU has no native bf16: running fp32")
        return "fp32"
    if requested == "bf16":
        return "bf16"
    reduced = "fp16" if device.type == "cuda" else "bf16"
    return reduced if guard_passed(reduced) else "fp32"


def guard_of(checkpoint: str | os.PathLike, device: torch.device) -> Callable[[str], bool]:
    """Whether the checkpoint's verdict for a dtype on this kind of device passed."""
    return lambda dtype: precision_allowed(checkpoint, device.type, dtype)


def torch_forward(model: nn.Module, device: torch.device, precision: str) -> Forward:
    dtype = AUTOCAST_DTYPES.get(precision)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return main_logits(model(batch))
    return forward


def compiled_forward(model: nn.Module, device: torch.device, precision: str) -> Forward:
    """``torch_forward`` through torch.compile, with shapes symbolic so that each new image size
    does not trigger a recompilation."""
    # torch 2.14.1's masked vectorization of loop tails, with symbolic sizes, writes out of bounds:
    # SMP's U-Net at 48x64 crashed (double free) on AVX-512 and gave logits of 1e22 with AVX2
    # kernels, both gone without it.  No inductor freezing: the inlined modules' parameters are graph
    # inputs, so it folded nothing (the same logits bit for bit in fp32 and bf16, the same speed), and
    # with it the AOTAutograd cache is bypassed: a worker's second start traced again, 7.4 s with it
    # and 3.4 s without (SMP U-Net ResNet-18, AMD EPYC avx512_bf16).
    options = {"cpp.enable_loop_tail_vec": False}
    compiled = torch.compile(torch_forward(model, device, precision), dynamic=True, options=options)
    # Under dynamic=True dynamo also makes the modules' float attributes symbolic, fails to turn
    # them into tensors and traces the whole network again (a tiny U-Net: 12 s of its 30 s warm-up
    # on an AVX2 EPYC); they are constants of the network, so they are specialised from the start.
    return torch._dynamo.config.patch(specialize_float=True)(compiled)


@dataclass(frozen=True)
class PreprocessInfo:
    """Where the network input came from, so its output can be mapped back."""
    original_size: tuple[int, int]  # (height, width) after EXIF rotation
    resized_size: tuple[int, int]  # (height, width) before the bottom/right padding


@dataclass
class Prediction:
    class_map: np.ndarray  # H x W class ids at the original size (uint8 up to 256 classes)
    # H x W float32: the predicted class's softmax probability (averaged over TTA views, blended over tiles)
    confidence: np.ndarray
    inference_ms: float  # the whole predict call: preprocessing, network, mapping back


def fit_long_side(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``long_side``, aspect kept, at least 1 pixel."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def network_input(pixels: np.ndarray, mean: list[float], std: list[float], device: torch.device) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W normalised float32 in channels_last memory."""
    # An H x W x 3 array viewed as 3 x H x W *is* channels_last: no transposing copy, and the uint8
    # pixels, a quarter of the float bytes, are what crosses to the device.
    planes = torch.from_numpy(pixels).to(device).permute(2, 0, 1)[None]
    return normalise(to_unit_range(planes), mean, std)


def rows_per_chunk(device: torch.device, rows: int) -> int:
    """The CPU works through cache-sized chunks (measured faster there); a GPU takes every row in
    one pass, where chunks would only mean many small kernel launches."""
    return PIXELS_PER_CHUNK if device.type == "cpu" else max(1, rows)


def top_class_and_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C x H x W logits -> (H x W argmax, H x W softmax probability of that class)."""
    classes, height, width = logits.shape
    # Pixel-major rows (a view of channels_last logits): softmax over a contiguous last dimension is
    # PyTorch's fastest, and a chunk of rows stays in cache between the softmax and the max.
    per_pixel = logits.permute(1, 2, 0).reshape(-1, classes)
    class_ids = torch.empty(per_pixel.shape[0], dtype=torch.int64, device=logits.device)
    confidence = torch.empty(per_pixel.shape[0], dtype=torch.float32, device=logits.device)
    chunk = rows_per_chunk(logits.device, per_pixel.shape[0])
    for start in range(0, per_pixel.shape[0], chunk):
        rows = slice(start, start + chunk)
        torch.max(torch.softmax(per_pixel[rows], dim=1, dtype=torch.float32), dim=1,
                  out=(confidence[rows], class_ids[rows]))
    return class_ids.view(height, width), confidence.view(height, width)


def resize_nearest(planes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """K x h x w float planes -> K x height x width, each output pixel from its nearest source pixel."""
    return F.interpolate(planes[None], size=(height, width), mode="nearest-exact")[0]


def class_map_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int32


class Predictor:
    """A model rebuilt from a checkpoint, with the preprocessing its ``meta`` prescribes.

    ``precision`` is what the network runs in: "fp32", "bf16" or "fp16" (see choose_precision);
    ``forward`` maps the 1 x 3 x h x w input to 1 x C x h x w logits (default: ``model`` in
    that precision).
    """

    def __init__(self, model: nn.Module, meta: dict, device: torch.device, precision: str = "fp32",
                 forward: Forward | None = None, backend: str = "torch") -> None:
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.num_classes: int = meta["num_classes"]
        self.input_size: tuple[int, int] = tuple(meta["input_size"])
        self.device = device
        self.precision = precision
        self.backend = backend
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self.forward: Forward = forward or torch_forward(self.model, device, precision)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        threads: int | None = None, precision: str = "auto", compiled: bool = False,
                        backend: str = "torch") -> Predictor:
        """Load ``path`` and run one warm-up prediction, so the first real request is not the slow one.

        ``precision``: "auto" (bf16/fp16 where the hardware has it and the checkpoint's precision
        guard passed for it, else fp32), "fp32", "bf16", "fp16" (CUDA only) or "int8" (OpenVINO only,
        with a passing verdict).  ``compiled``:
        torch.compile the network (its cost is paid here, in the warm-up).  ``backend``: "auto"
        (on_the_fastest), "torch", "onnxruntime" (CPU, fp32) or "openvino" (CPU).
        """
        if precision not in SERVING_PRECISIONS:
            raise ValueError(f"precision must be one of {SERVING_PRECISIONS}, not {precision!r}")
        if backend not in SERVING_BACKENDS:
            raise ValueError(f"backend must be one of {SERVING_BACKENDS}, not {backend!r}")
        if threads is not None:
            torch.set_num_threads(threads)
        device = pick_device(device)
        checkpoint = load_checkpoint(path, map_location=device)
        model, meta = model_from_checkpoint(checkpoint), checkpoint["meta"]
        if backend == "auto":
            predictor = cls.on_the_fastest(path, model, meta, device, precision, threads, compiled)
        elif backend == "onnxruntime":
            predictor = cls.on_onnxruntime(path, model, meta, device, precision)
        elif backend == "openvino":
            predictor = cls.on_openvino(path, model, meta, device, precision, threads)
        else:
            predictor = cls.on_torch(path, model, meta, device, precision, compiled)
        predictor.warm_up()
        return predictor

    @classmethod
    def on_torch(cls, path: str | os.PathLike, model: nn.Module, meta: dict, device: torch.device,
                 precision: str, compiled: bool) -> Predictor:
        chosen = choose_precision(precision, device, guard_of(path, device))
        predictor = cls(model, meta, device, chosen)
        if compiled:
            predictor.forward = compiled_forward(predictor.model, device, chosen)
        return predictor

    @classmethod
    def on_the_fastest(cls, path: str | os.PathLike, model: nn.Module, meta: dict, device: torch.device,
                       precision: str, threads: int | None, compiled: bool) -> Predictor:
        """The fastest guarded way: on the CPU, OpenVINO in int8 or bf16 where their verdicts
        passed, else torch in a guarded bf16, else OpenVINO fp32 (torch fp32's class maps, faster);
        torch on a GPU, for torch.compile, and where OpenVINO is missing or cannot convert the
        network (with a log line)."""
        if device.type == "cpu" and not compiled:
            try:
                ir, chosen = openvino_model(path, model, precision)
                if chosen != "fp32" or choose_precision(precision, device, guard_of(path, device)) == "fp32":
                    return cls(model, meta, device, chosen, OpenVINOForward(ir, threads, chosen), "openvino")
            except (ImportError, RuntimeError) as error:  # RuntimeError: OpenVINO's conversion failures
                log.warning("the network runs on torch: %s", str(error).splitlines()[0])
        return cls.on_torch(path, model, meta, device, precision, compiled)

    @classmethod
    def on_onnxruntime(cls, path: str | os.PathLike, model: nn.Module, meta: dict, device: torch.device,
                       precision: str) -> Predictor:
        if device.type != "cpu" or precision == "bf16":
            raise ValueError("the onnxruntime backend runs on the CPU in fp32 only")
        session = checkpoint_session(path, model)
        return cls(model, meta, device, "fp32", lambda batch: run_session(session, batch), "onnxruntime")

    @classmethod
    def on_openvino(cls, path: str | os.PathLike, model: nn.Module, meta: dict, device: torch.device,
                    precision: str, threads: int | None) -> Predictor:
        if device.type != "cpu":
            raise ValueError("the openvino backend runs on the CPU")
        ir, chosen = openvino_model(path, model, precision)
        return cls(model, meta, device, chosen, OpenVINOForward(ir, threads, chosen), "openvino")

    def warm_up(self) -> None:
        """One prediction on a blank landscape photo of the network's size (compiles, if compiled)."""
        long_side = max(self.input_size)
        # Not square even once padded: torch.compile would take height == width as a rule and recompile.
        self.predict(Image.new("RGB", (long_side, max(1, long_side - SIZE_MULTIPLE))))

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, PreprocessInfo]:
        """1 x 3 x h x w network input: long side scaled to the training size, normalised,
        zero-padded bottom/right to a size the network accepts, as in evaluation."""
        rgb = to_rgb(image)
        resized = rgb.resize(fit_long_side(*rgb.size, max(self.input_size)), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized)
        height, width = pixels.shape[:2]
        # SegNet and the reflect-padded U-Net need 32 pixels: a very long, thin photo is padded to that.
        padded_height, padded_width = padded_size(height, width, minimum=min_input_size(self.model))
        pixels = np.pad(pixels, ((0, padded_height - height), (0, padded_width - width), (0, 0)))
        info = PreprocessInfo(original_size=(rgb.height, rgb.width), resized_size=(height, width))
        return network_input(pixels, self.meta["mean"], self.meta["std"], self.device), info

    @torch.inference_mode()
    def predict(self, image: Image.Image, strategy: Strategy = WHOLE) -> Prediction:
        """Class ids and confidences for every pixel of ``image`` (EXIF rotation applied), seen
        as ``strategy`` says (utils/inference/tiling.py; default: whole, one forward)."""
        started = time.perf_counter()
        if strategy.mode == "slide":
            pixels, info = self.at_scale(image, strategy.scale or 1.0)
            class_ids, confidence = slide(pixels, self.tile_probabilities(strategy.tta),
                                          *strategy.tile_and_stride(self.input_size), self.num_classes)
        else:
            batch, info = self.preprocess(image)
            if strategy.plain:
                class_ids, confidence = self.class_and_confidence(batch)
            else:
                confidence, class_ids = tta_probabilities(self.forward, batch, strategy.tta, min_input_size(self.model),
                                                          self.black())[0].max(dim=0)
        class_map, confidence = to_original_size(class_ids, confidence, info, self.num_classes)
        return Prediction(class_map=class_map, confidence=confidence,
                          inference_ms=(time.perf_counter() - started) * 1000)

    def class_and_confidence(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H x W class ids and confidence of a preprocessed image: from the runtime's graph where
        it computes them (OpenVINOForward.class_and_confidence), else reduced from the logits here."""
        in_graph = getattr(self.forward, "class_and_confidence", None)
        if in_graph is not None:
            return in_graph(batch)
        return top_class_and_confidence(self.forward(batch)[0])

    def at_scale(self, image: Image.Image, scale: float) -> tuple[np.ndarray, PreprocessInfo]:
        """The RGB pixels of ``image`` resized by ``scale`` (slide mode's working resolution)."""
        rgb = to_rgb(image)
        scaled = rgb if scale == 1.0 else rgb.resize(
            scaled_size(rgb.size, scale), Image.Resampling.BILINEAR)
        pixels = np.asarray(scaled)
        return pixels, PreprocessInfo(original_size=(rgb.height, rgb.width), resized_size=pixels.shape[:2])

    def tile_probabilities(self, tta: str) -> TileProbabilities:
        """A tile's pixels -> its h x w x C probabilities on the CPU, where slide mode blends them."""
        def probabilities(tile: np.ndarray) -> torch.Tensor:
            # A copy: the tile is a view into the read-only decoded image, which torch would warn about.
            batch = network_input(np.array(tile), self.meta["mean"], self.meta["std"], self.device)
            probabilities = tta_probabilities(self.forward, batch, tta, min_input_size(self.model), self.black())
            return probabilities[0].permute(1, 2, 0).cpu()
        return probabilities

    def black(self) -> torch.Tensor:
        """1 x 3 x 1 x 1: a black pixel normalised, what preprocess pads an image with."""
        return network_input(np.zeros((1, 1, 3), np.uint8), self.meta["mean"], self.meta["std"], self.device)

    @torch.inference_mode()
    def class_map_and_margin(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """predict()'s class map, with each pixel's softmax margin of the top class over the runner-up:
        how near a tie the pixel was (what the precision guard reads changed pixels by)."""
        batch, info = self.preprocess(image)
        logits = self.forward(batch)[0]
        class_ids, _ = top_class_and_confidence(logits)
        top2 = torch.softmax(logits.float(), dim=0).topk(2, dim=0).values
        return to_original_size(class_ids, top2[0] - top2[1], info, self.num_classes)


def to_original_size(class_ids: torch.Tensor, confidence: torch.Tensor, info: PreprocessInfo,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The two padded network-size maps cropped and resized (nearest) to the original image,
    as numpy arrays.  Cropping here, after the argmax, spares copying channels_last logits;
    resizing the maps, never the C-channel logits, keeps large images cheap."""
    height, width = info.resized_size
    class_ids, confidence = class_ids[:height, :width], confidence[:height, :width]
    if info.resized_size != info.original_size:
        class_ids, confidence = resize_nearest(torch.stack([class_ids.float(), confidence]), *info.original_size)
    return class_ids.to(class_map_dtype(num_classes)).cpu().numpy(), confidence.cpu().numpy()
