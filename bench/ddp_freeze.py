"""What --freeze-encoder-epochs costs under torchrun: rebuilding DDP once when the encoder thaws,
against DDP's search for unused parameters at every step (the alternative).

    torchrun --nproc_per_node=2 bench/ddp_freeze.py [--steps 20] [--crop-size 128] [--batch-size 2]

The model is train.py's SMP U-Net on MobileNetV2 (91 classes), the encoder frozen as in the
frozen epochs.  Prints, on rank 0: the median time to build DistributedDataParallel around it
(after freezing, as train.py does), and the median training step (forward, loss, backward, Adam)
of that wrapper against one built before freezing with find_unused_parameters, alternately.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine  # noqa: E402

from model import build_model  # noqa: E402
from utils import distributed  # noqa: E402


def step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                 target: torch.Tensor) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(batch), target).backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    context = distributed.setup("cpu")
    torch.manual_seed(0)
    model = build_model("smp_unet", num_classes=91).to(memory_format=torch.channels_last)
    # The alternative wraps once, before freezing, and searches at every step; ours wraps after.
    wrapped = {True: nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)}
    model.encoder.requires_grad_(False)
    wraps = []
    for _ in range(5):
        started = time.perf_counter()
        wrapped[False] = nn.parallel.DistributedDataParallel(model)
        wraps.append(time.perf_counter() - started)
    optimizer = torch.optim.Adam(model.parameters())
    batch = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size)
    batch = batch.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 91, (args.batch_size, args.crop_size, args.crop_size))
    steps: dict[bool, list[float]] = {False: [], True: []}
    for find_unused in (False, True):
        step_seconds(wrapped[find_unused], optimizer, batch, target)  # warm-up
    for _ in range(args.steps):
        for find_unused in (False, True):
            steps[find_unused].append(step_seconds(wrapped[find_unused], optimizer, batch, target))
    if context.is_main:
        print(machine())
        print(f"{context.world_size} processes (gloo), {args.batch_size} x {args.crop_size} px crops, "
              f"{args.steps} steps each, alternated")
        print(f"building DDP: {statistics.median(wraps) * 1000:.0f} ms (paid once, when the encoder thaws)")
        plain, searching = (statistics.median(steps[flag]) * 1000 for flag in (False, True))
        print(f"step: {plain:.1f} ms; with find_unused_parameters: {searching:.1f} ms "
              f"({searching / plain - 1:+.1%} on every step)")
        print(f"ratio: {searching / plain:.2f}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
