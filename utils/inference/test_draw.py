"""test_draw.py's engine: prediction panels for a sample of images, and inference timing."""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from utils.data.datasets import PairedDataset, build_dataset
from utils.drawing import panels
from utils.fileio import atomic_path, write_text
from utils.inference.predictor import Predictor
from utils.inference.tiling import Strategy, strategy_from_args

log = logging.getLogger("test_draw")


def draw_split(predictor: Predictor, strategy: Strategy, dataset: PairedDataset, count: int, out_dir: Path,
               prefix: str) -> int:
    """image | truth | prediction panels for the first ``count`` images of ``dataset``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = range(min(count, len(dataset)))
    for index in tqdm(chosen, desc=f"draw {prefix}", dynamic_ncols=True):
        image, truth = dataset.load(index)
        prediction = predictor.predict(Image.fromarray(image), strategy)
        panel = panels(Image.fromarray(image), truth, prediction.class_map, predictor.class_names)
        with atomic_path(out_dir / f"{prefix}_{dataset.pairs[index][0].stem}.jpg") as tmp:
            panel.save(tmp, format="JPEG", quality=90)
    return len(chosen)


def draw(args: argparse.Namespace) -> None:
    strategy = strategy_from_args(args)
    predictor = Predictor.from_checkpoint(args.checkpoint, threads=args.threads, backend=args.backend)
    out_dir = Path(args.save_dir) / "draw"
    drawn = sum(draw_split(predictor, strategy, build_dataset(args, split), args.count, out_dir, split)
                for split in ("train", "val"))
    log.info("drew %d panels into %s", drawn, out_dir)


def compute_time(args: argparse.Namespace) -> dict:
    """Latency of the whole predictor path over ``args.count`` images, seen as ``args`` says (mode,
    tta), after a warm-up."""
    strategy = strategy_from_args(args)
    predictor = Predictor.from_checkpoint(args.checkpoint, threads=args.threads, backend=args.backend)
    dataset = build_dataset(args, "val")
    images = [Image.fromarray(dataset.load(i % len(dataset))[0]) for i in range(min(args.count, len(dataset)))]
    for image in images[: args.warmup]:
        predictor.predict(image, strategy)
    latencies = []
    for n in tqdm(range(args.count), desc="timing", dynamic_ncols=True):
        started = time.perf_counter()
        predictor.predict(images[n % len(images)], strategy)
        latencies.append((time.perf_counter() - started) * 1000)
    result = {"images": args.count, "mode": strategy.mode, "tta": strategy.tta, "device": str(predictor.device),
              "threads": torch.get_num_threads(),
              "input_size": predictor.input_size, "mean_ms": statistics.fmean(latencies),
              "median_ms": statistics.median(latencies), "images_per_s": 1000 * args.count / sum(latencies)}
    text = (f"{result['images']} images ({strategy.mode}, tta {strategy.tta}) on {result['device']} "
            f"({result['threads']} threads), input size "
            f"{result['input_size']}: mean {result['mean_ms']:.1f} ms, median {result['median_ms']:.1f} ms, "
            f"{result['images_per_s']:.2f} images/s")
    write_text(Path(args.save_dir) / "compute_time.txt", text + "\n")
    log.info(text)
    return result
