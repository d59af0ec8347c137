"""Would a GPU starve?  Training input pipeline images/s against the model's training step.

    python bench/loader.py [--batch-size 8] [--crop-size 512] [--workers N] [--augment basic ...]
                           [--model unet --base-width 64 | --model smp_unet --encoder mobilenet_v2]

The pipeline: coco128 (../shared/data) converted to masks in a temporary folder, read by
utils.data.datasets with each augmentation preset's transform (utils/data/augment.py: decode, random
scale, flip, crop, then the preset's effects, normalise) and collated by a DataLoader with the
configured workers; one figure per preset.  The step: forward,
loss, backward and Adam on a batch of the same shape, of the model train.py builds from the same
--model options (91 classes, random init).  Both alone on the machine, one after
the other.  Last line: ``ratio: X.XX``, the slowest preset's loader images/s over CPU training
images/s; the GPU figure says how fast a GPU may train before this loader becomes the bottleneck.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import SHARED, background_load, machine, seconds_of
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import config
from model import build_model, main_logits
from utils.classes import COCO_CLASSES, IGNORE_INDEX
from utils.data.augment import PRESETS, train_transform
from utils.data.coco_convert import convert
from utils.data.datasets import build_dataset
from utils.precision import AUTOCAST_PRECISIONS, autocast
from utils.training.options import add_architecture_arguments, arch_args

COCO128 = SHARED / "coco128"


def training_loader(masks: Path, args: argparse.Namespace, preset: str) -> DataLoader:
    layout = argparse.Namespace(dataset="coco", data_dir=str(COCO128), mask_dir=str(masks), train_split="train2017",
                                val_split="train2017")
    dataset = build_dataset(layout, "train", train_transform(preset, args.crop_size))
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
                      persistent_workers=args.workers > 0)


def loader_images_per_second(loader: DataLoader, batches: int) -> float:
    """Batches drawn over repeated epochs; the clock starts at the first batch (workers started)."""
    stream = itertools.chain.from_iterable(itertools.repeat(loader))
    next(stream)
    started = time.perf_counter()
    images_seen = sum(images.shape[0] for images, _ in itertools.islice(stream, batches))
    return images_seen / (time.perf_counter() - started)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, masks: torch.Tensor,
                  precision: str) -> None:
    with autocast(images.device, precision):
        loss = nn.functional.cross_entropy(main_logits(model(images)), masks, ignore_index=IGNORE_INDEX)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def training_flops_per_image(model: nn.Module, crop_size: int) -> int:
    """Forward and backward (about twice the forward) of one image, counted on two: models with
    BatchNorm after a global pooling cannot train on a batch of one."""
    with FlopCounterMode(display=False) as counter:
        images = torch.zeros(2, 3, crop_size, crop_size).contiguous(memory_format=torch.channels_last)
        main_logits(model(images)).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() // 2


def step_seconds(args: argparse.Namespace) -> tuple[float, int]:
    """Median seconds of one training step at the loader's batch shape, and FLOPs per image."""
    torch.manual_seed(0)
    model = build_model(args.model, **arch_args(args, len(COCO_CLASSES)))
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size).contiguous(
        memory_format=torch.channels_last)
    masks = torch.randint(0, len(COCO_CLASSES), (args.batch_size, args.crop_size, args.crop_size))
    training_step(model, optimizer, images, masks, args.precision)  # first-call allocations
    seconds = statistics.median(seconds_of(lambda: training_step(model, optimizer, images, masks, args.precision))
                                for _ in range(args.steps))
    return seconds, training_flops_per_image(model, args.crop_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, "batch_size", "crop_size", "workers")
    add_architecture_arguments(parser)
    parser.add_argument("--batches", type=int, default=48, help="batches timed from the loader")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed (median)")
    parser.add_argument("--precision", choices=AUTOCAST_PRECISIONS, default="auto", help="as train.py --precision")
    parser.add_argument("--augment", choices=PRESETS, nargs="+", default=list(PRESETS),
                        help="presets to time (default: all)")
    args = parser.parse_args()
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        sys.exit(f"error: {COCO128} not found: the loader benchmark reads coco128 from ../shared/data")
    print(background_load() + machine())
    with tempfile.TemporaryDirectory() as folder:
        masks = Path(folder) / "masks"
        convert(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "train2017", masks / "train2017",
                workers=args.workers or 1)
        rates = {preset: loader_images_per_second(training_loader(masks, args, preset), args.batches)
                 for preset in args.augment}
    step, flops = step_seconds(args)
    step_rate = args.batch_size / step
    shown = ", ".join(f"{k}={v}" for k, v in arch_args(args, len(COCO_CLASSES)).items() if k != "num_classes")
    print(f"batch {args.batch_size} x {args.crop_size}x{args.crop_size}, {args.model} ({shown}), "
          f"precision {args.precision}, {torch.get_num_threads()} torch threads")
    for preset, rate in rates.items():
        print(f"input pipeline, {preset:<11} ({args.workers} workers, decode to batch): {rate:8.1f} images/s")
    loader_rate = min(rates.values())
    print(f"training step on this CPU ({step:.2f} s per batch):              {step_rate:8.1f} images/s")
    print(f"training FLOPs per image: {flops / 1e9:.0f} GFLOP; the loader feeds a GPU that trains at up to "
          f"{loader_rate * flops / 1e12:.1f} TFLOP/s effective before it starves")
    print(f"ratio: {loader_rate / step_rate:.2f}")


if __name__ == "__main__":
    main()
