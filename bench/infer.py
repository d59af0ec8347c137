"""Inference speed against the machine's limit: each execution mode side by side, and the
service path stage by stage.

    python bench/infer.py [--checkpoint FILE [--baseline FILE]] [--width 640 --height 480] [--repeat 10]
                          [--service-only]
    python bench/infer.py --architectures segnet smp_fpn ... [--size 512] [--repeat 5]

Without --checkpoint: the full U-Net (base width 64, random init, 91 classes) on a 512x512
photo, then save/default/model.pth on a 640x480 photo when it exists.  For each model: the
FLOPs of one forward, the matmul peak (fp32, and bf16 where native; a large torch.mm), the median
forward time of each mode (fp32 eager NCHW, fp32 channels_last, bf16 channels_last,
torch.compile, ONNX Runtime, OpenVINO) as a ratio to the compute floor (FLOPs / bf16 peak, or
fp32 peak where the CPU lacks native bf16) and to fp32 eager; then the
service path of ``POST /json?rle=1`` (decode, preprocess, forward, argmax/confidence, upsample,
summarize, overlay, JPEG encode, class-id PNG encode, RLE encode, JSON encode) with the
precision the service would choose.  Last line: ``ratio: X.XX``, the service path of the last
model over its compute floor (goal <= 1.5).  --service-backends torch openvino times the service
path on each backend in the same run and prints their ratio; --baseline FILE adds that
checkpoint's service path on torch fp32 and each backend's speed-up over it (an old model
against its successor).

With --architectures: only each named registry model (default arguments, 91 classes, random
init) with its parameter count and the median fp32 channels_last forward of one size x size image.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchlib import ROOT, background_load, cores, machine, median_ms, photo_jpeg, seconds_of
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from app.coco_rle import class_rles
from app.results import ResultFiles
from app.uploads import decode_image
from model import build_model, model_meta
from model.registry import ARCHITECTURES
from utils.checkpoint import save_checkpoint
from utils.classes import COCO_CLASSES
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils.drawing import render_overlay
from utils.inference.predictor import BACKENDS, Prediction, Predictor, to_original_size, top_class_and_confidence
from utils.inference.summary import summarize
from utils.precision import cpu_supports_bf16

DEFAULT_MODEL = ROOT / "save" / "default" / "model.pth"
SERVICE_GOAL = 1.5  # service path median / bf16 compute floor
OVERHEAD_GOAL = 0.15  # everything but the forward, as a fraction of the forward
MASK_GOAL = 0.10  # class-id PNG and RLE together, as a fraction of the forward
MASK_STAGES = ("mask PNG encode + write", "RLE encode")


@dataclasses.dataclass
class Case:
    name: str
    checkpoint: Path
    width: int
    height: int


@dataclasses.dataclass
class Mode:
    name: str
    predictor: Predictor
    batch: torch.Tensor
    load_seconds: float


def random_unet_checkpoint(folder: Path, size: int) -> Path:
    """The full U-Net, randomly initialised, saved as a checkpoint served at ``size``."""
    torch.manual_seed(0)
    arch_args = {"num_classes": len(COCO_CLASSES), "base_width": 64, "bilinear": True}
    meta = model_meta("unet", arch_args, list(COCO_CLASSES), [size, size], IMAGENET_MEAN, IMAGENET_STD)
    path = folder / "unet64-random.pth"
    save_checkpoint(path, {"model": build_model("unet", **arch_args).state_dict(), "meta": meta})
    return path


def matmul_peak_gflops(dtype: torch.dtype, size: int = 4096, repeat: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / median_ms(lambda: torch.mm(a, b), repeat) / 1e6


@torch.inference_mode()
def forward_flops(predictor: Predictor, batch: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        predictor.model(batch)
    return counter.get_total_flops()


def load_modes(checkpoint: Path, photo: Image.Image) -> list[Mode]:
    """Every mode this machine can run, each a predictor loaded (and warmed up) as the service would."""
    reduced = "bf16" if cpu_supports_bf16() else "fp32"
    options: list[tuple[str, dict]] = [
        ("fp32 eager (NCHW)", {"precision": "fp32"}),
        ("fp32 channels_last", {"precision": "fp32"}),
        (f"{reduced} channels_last", {"precision": reduced}),
        (f"torch.compile {reduced}", {"precision": reduced, "compiled": True}),
    ]
    if all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript")):
        options.append(("onnxruntime fp32", {"backend": "onnxruntime"}))
    else:
        print("onnxruntime fp32: skipped (pip install -r requirements-dev.txt)")
    if importlib.util.find_spec("openvino"):
        options.append(("openvino fp32", {"backend": "openvino"}))
    else:
        print("openvino fp32: skipped (pip install -r requirements.txt)")
    modes = []
    for name, keywords in options:
        started = time.perf_counter()
        predictor = Predictor.from_checkpoint(checkpoint, device="cpu", **keywords)
        seconds = time.perf_counter() - started
        batch, _ = predictor.preprocess(photo)
        if name.startswith("fp32 eager"):
            predictor.model.to(memory_format=torch.contiguous_format)  # the textbook layout, as the baseline
            batch = batch.contiguous()
        modes.append(Mode(name, predictor, batch, seconds))
    return modes


@torch.inference_mode()
def time_modes(modes: list[Mode], repeat: int) -> dict[str, float]:
    """Median forward ms of each mode, the modes taking turns so that drift hits them alike."""
    samples: dict[str, list[float]] = {mode.name: [] for mode in modes}
    for mode in modes:
        mode.predictor.forward(mode.batch)
    for _ in range(repeat):
        for mode in modes:
            samples[mode.name].append(seconds_of(lambda m=mode: m.predictor.forward(m.batch)) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def service_stages(predictor: Predictor, jpeg: bytes, results: Path) -> list[tuple[str, Callable[[dict], object]]]:
    """The service path cut into its stages; each reads what the previous ones left in ``state``."""
    def decode(state: dict) -> None:
        state["image"] = decode_image(jpeg, 40_000_000)

    def preprocess(state: dict) -> None:
        state["batch"], state["info"] = predictor.preprocess(state["image"])

    # OpenVINO computes each pixel's class and confidence inside its graph, so its "forward" stage
    # includes them and its argmax/confidence stage is empty (Predictor.class_and_confidence).
    in_graph = hasattr(predictor.forward, "class_and_confidence")

    def forward(state: dict) -> None:
        if in_graph:
            state["top"] = predictor.class_and_confidence(state["batch"])
        else:
            state["logits"] = predictor.forward(state["batch"])

    def top(state: dict) -> None:
        if not in_graph:
            state["top"] = top_class_and_confidence(state["logits"][0])

    def upsample(state: dict) -> None:
        class_map, confidence = to_original_size(*state["top"], state["info"], predictor.num_classes)
        state["prediction"] = Prediction(class_map, confidence, 0.0)

    def summary(state: dict) -> None:
        state["classes"] = summarize(state["prediction"], predictor.class_names)

    def overlay(state: dict) -> None:
        state["overlay"] = render_overlay(state["image"], state["prediction"].class_map)

    def encode(state: dict) -> None:
        state["files"] = ResultFiles(results)
        state["files"].save_jpeg("overlay", state["overlay"])

    def mask_png(state: dict) -> None:
        state["files"].save_mask(state["prediction"].class_map)

    def rle(state: dict) -> None:
        state["rles"] = class_rles(state["prediction"].class_map, [entry["id"] for entry in state["classes"]])

    def answer(state: dict) -> None:
        classes = [dict(entry, rle=state["rles"][entry["id"]]) for entry in state["classes"]]
        state["files"].save_json(json.dumps({"classes": classes}))

    return [("decode JPEG", decode), ("preprocess/resize", preprocess), ("forward", forward),
            ("argmax/confidence", top), ("upsample", upsample), ("summarize", summary),
            ("overlay", overlay), ("JPEG encode + write", encode), (MASK_STAGES[0], mask_png),
            (MASK_STAGES[1], rle), ("JSON encode + write", answer)]


@torch.inference_mode()
def time_service_path(predictor: Predictor, jpeg: bytes, repeat: int) -> tuple[dict[str, float], float]:
    """Median ms of each stage, and the median of the whole path run end to end."""
    with tempfile.TemporaryDirectory() as folder:
        stages = service_stages(predictor, jpeg, Path(folder))
        samples: dict[str, list[float]] = {name: [] for name, _ in stages}
        totals = []
        for round_number in range(repeat + 1):
            state: dict = {}
            total = 0.0
            for name, stage in stages:
                started = time.perf_counter()
                stage(state)
                seconds = time.perf_counter() - started
                samples[name].append(seconds * 1000)
                total += seconds
            if round_number:  # the first round warms caches
                totals.append(total * 1000)
            for path in Path(folder).iterdir():  # untimed: the next round writes its own
                path.unlink()
    return {name: statistics.median(values[1:]) for name, values in samples.items()}, statistics.median(totals)


def report_modes(checkpoint: Path, photo: Image.Image, repeat: int, flops: int, floor_ms: float) -> None:
    """Every execution mode's median forward against the compute floor and fp32 eager."""
    modes = load_modes(checkpoint, photo)
    medians = time_modes(modes, repeat)
    eager = medians[modes[0].name]
    print(f"{'mode':<26}{'median ms':>10}{'x floor':>9}{'x fp32 eager':>14}{'GFLOP/s':>9}{'load s':>8}")
    for mode in modes:
        ms = medians[mode.name]
        print(f"{mode.name:<26}{ms:>10.1f}{ms / floor_ms:>9.2f}{ms / eager:>14.2f}{flops / ms / 1e6:>9.0f}"
              f"{mode.load_seconds:>8.1f}")


def report_case(case: Case, repeat: int, peaks: dict[str, float], service_precision: str,
                service_only: bool, backends: list[str]) -> tuple[dict[str, float], float]:
    """Print one model's figures; returns its service path median ms per backend, and its compute floor."""
    jpeg = photo_jpeg(case.width, case.height)
    photo = decode_image(jpeg, 40_000_000)
    torch_path = Predictor.from_checkpoint(case.checkpoint, device="cpu", precision=service_precision)
    batch, _ = torch_path.preprocess(photo)
    flops = forward_flops(torch_path, batch)
    floor_dtype = floor_precision()
    floor_ms = flops / peaks[floor_dtype] / 1e6
    height, width = batch.shape[-2:]
    print(f"\n== {case.name}: {case.width}x{case.height} photo, network input {width}x{height} ==")
    print(f"FLOPs per forward: {flops / 1e9:.1f} GFLOP; compute floor (FLOPs / {floor_dtype} peak): {floor_ms:.1f} ms")
    if not service_only:
        report_modes(case.checkpoint, photo, repeat, flops, floor_ms)
    totals = {}
    for backend in backends:
        served = torch_path if backend == "torch" else Predictor.from_checkpoint(
            case.checkpoint, device="cpu", precision=service_precision, backend=backend)
        totals[backend] = report_service_path(served, backend, jpeg, repeat, floor_ms, floor_dtype)
    first = backends[0]
    for backend in backends[1:]:
        print(f"service path end to end, {first} / {backend}: {totals[first] / totals[backend]:.2f}x")
    return totals, floor_ms


def floor_precision() -> str:
    """The dtype of the compute floor: bf16 where the CPU has it natively, else fp32 (emulated bf16
    is slower than fp32, and its matmul peak would take minutes to measure)."""
    return "bf16" if cpu_supports_bf16() else "fp32"


def report_service_path(served: Predictor, backend: str, jpeg: bytes, repeat: int, floor_ms: float,
                        floor_dtype: str) -> float:
    """Print the service path stage by stage; returns its end-to-end median ms."""
    stages, total = time_service_path(served, jpeg, repeat)
    forward = stages["forward"]
    print(f"service path ({backend} {served.precision}, {torch.get_num_threads()} threads), median ms:")
    for name, ms in stages.items():
        share = "" if name == "forward" else f"{ms / forward:8.1%} of forward"
        print(f"  {name:<22}{ms:>8.1f}  {share}")
    overhead = sum(stages.values()) - forward
    print(f"  everything but the forward: {overhead:.1f} ms = {overhead / forward:.1%} of the forward "
          f"(goal <= {OVERHEAD_GOAL:.0%})")
    mask = sum(stages[name] for name in MASK_STAGES)
    print(f"  class-id PNG + RLE: {mask:.1f} ms = {mask / forward:.1%} of the forward (goal <= {MASK_GOAL:.0%})")
    print(f"  whole path end to end: {total:.1f} ms = {total / floor_ms:.2f}x the {floor_dtype} compute floor "
          f"(goal <= {SERVICE_GOAL})")
    return total


@torch.inference_mode()
def report_architectures(names: list[str], size: int, repeat: int) -> None:
    """Parameters and median fp32 channels_last forward ms of each registry model at its defaults."""
    print(f"{'model':<28}{'parameters':>14}{f'forward ms at {size}x{size}':>24}")
    images = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    for name in names:
        torch.manual_seed(0)
        model = build_model(name, num_classes=len(COCO_CLASSES)).eval().to(memory_format=torch.channels_last)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{name:<28}{parameters:>14,}{median_ms(lambda m=model: m(images), repeat):>24.0f}")


def cases(args: argparse.Namespace, folder: Path) -> list[Case]:
    if args.checkpoint:
        return [Case(Path(args.checkpoint).name, Path(args.checkpoint), args.width, args.height)]
    chosen = [Case("U-Net base 64, random init", random_unet_checkpoint(folder, 512), 512, 512)]
    if DEFAULT_MODEL.is_file():
        chosen.append(Case("default model (save/default/model.pth)", DEFAULT_MODEL, 640, 480))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="time this checkpoint only")
    parser.add_argument("--baseline", help="with --checkpoint: also time this checkpoint's service path on torch "
                                           "fp32 in the same run, and print each backend's speed-up over it")
    parser.add_argument("--width", type=int, default=640, help="photo width with --checkpoint")
    parser.add_argument("--height", type=int, default=480, help="photo height with --checkpoint")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs of each mode (medians reported)")
    parser.add_argument("--threads", type=int, default=cores(), help="torch threads (default: all cores)")
    parser.add_argument("--service-only", action="store_true",
                        help="only the service path, not the comparison of execution modes (minutes less)")
    parser.add_argument("--service-precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the service path's precision (auto: as the service decides)")
    parser.add_argument("--service-backends", nargs="+", choices=BACKENDS, default=["torch"],
                        help="time the service path on each, side by side (for example: torch openvino)")
    parser.add_argument("--architectures", nargs="+", choices=sorted(ARCHITECTURES), metavar="MODEL",
                        help="only time these registry models' forward at --size (parameters too)")
    parser.add_argument("--size", type=int, default=512, help="image side with --architectures")
    args = parser.parse_args()
    if args.baseline and not args.checkpoint:
        parser.error("--baseline compares against --checkpoint: give both")
    torch.set_num_threads(args.threads)
    print(background_load() + machine())
    if args.architectures:
        report_architectures(args.architectures, args.size, args.repeat)
        return
    peaks = {"fp32": matmul_peak_gflops(torch.float32)}
    if cpu_supports_bf16():
        peaks["bf16"] = matmul_peak_gflops(torch.bfloat16)
    shown = ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in peaks.items())
    skipped = "" if "bf16" in peaks else " (bf16 skipped: not native on this CPU)"
    print(f"matmul peak (4096x4096 torch.mm, {args.threads} threads): {shown}{skipped}")
    with tempfile.TemporaryDirectory() as folder:
        results = [report_case(case, args.repeat, peaks, args.service_precision, args.service_only,
                               args.service_backends)
                   for case in cases(args, Path(folder))]
    if args.baseline:
        report_speedup(args, peaks, results[-1][0])
    totals, floor_ms = results[-1]
    print(f"ratio: {totals[args.service_backends[-1]] / floor_ms:.2f}")


def report_speedup(args: argparse.Namespace, peaks: dict[str, float], totals: dict[str, float]) -> None:
    """The baseline checkpoint's service path on torch fp32, in the same run, over each backend's."""
    baseline = Case(f"baseline {Path(args.baseline).name}", Path(args.baseline), args.width, args.height)
    reference = report_case(baseline, args.repeat, peaks, "fp32", True, ["torch"])[0]["torch"]
    for backend, ms in totals.items():
        print(f"service path end to end, baseline torch fp32 / {Path(args.checkpoint).name} {backend}: "
              f"{reference / ms:.2f}x")


if __name__ == "__main__":
    main()
