"""torchrun / DistributedDataParallel set-up in a few lines; a no-op for a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Context:
    """Join the process group when started by torchrun (nccl on GPU, gloo on CPU)."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" not in os.environ:
        return Context(device=torch.device(device or ("cuda" if cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpu = torch.device("cuda", local_rank) if cuda else None
    if gpu is not None:
        torch.cuda.set_device(gpu)
    if not dist.is_initialized():  # tests/ddp_matrix.py runs many trainings in one group
        # device_id binds the group to this process's GPU now, so NCCL never has to guess it later.
        dist.init_process_group("nccl" if cuda else "gloo", device_id=gpu)
    return Context(dist.get_rank(), dist.get_world_size(), gpu or torch.device("cpu"))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` across processes in place (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_dicts(local: dict) -> dict:
    """The union of every rank's ``local`` dict (the dict itself for a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(local)
    parts: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, local)
    return {key: value for part in parts for key, value in part.items()}


class ShardSampler(Sampler[int]):
    """Every rank takes indices rank, rank+world, ... : no sample is seen twice.

    For evaluation, where DistributedSampler's padding would count some images twice.
    """

    def __init__(self, length: int, context: Context) -> None:
        self.indices = list(range(context.rank, length, context.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
