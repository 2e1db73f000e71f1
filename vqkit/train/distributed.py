"""Process-group setup for ``torchrun`` (one process per device, gloo on CPU and nccl on CUDA),
and the per-step seeding and data sharding that make runs reproducible on any number of ranks.

``torchrun`` announces each process through the RANK, WORLD_SIZE and LOCAL_RANK environment
variables; without them training runs as one process and nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from vqkit.config import Device, choices
from vqkit.errors import VqkitError, shown

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # True when this module created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files or shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (a collective call)."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """Resolve a device setting (named ``setting`` in errors): "auto" (CUDA when there is one),
    "cpu", "cuda" (the GPU of the process on ``local_rank``) or "cuda:N"."""
    kind, colon, index = name.partition(":")
    if kind not in choices(Device) or colon and (kind != "cuda" or not index.isdigit()):
        allowed = ", ".join(choices(Device))
        raise VqkitError(f"{setting} must be one of {allowed} or cuda:N, got '{shown(name)}'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise VqkitError(f"{setting} is '{name}' but no CUDA device is available")
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if colon:
        if int(index) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise VqkitError(f"{setting} is '{name}' but this machine has {count} CUDA devices")
        return torch.device("cuda", int(index))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str) -> Distributed:
    """Join the ``torchrun`` process group when its variables are set, else run alone."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return Distributed(rank, world_size, pick_device(device, local_rank), owns_group=False)
    if not all(v in os.environ for v in TORCHRUN_VARS):
        return Distributed(0, 1, pick_device(device), owns_group=False)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    here = pick_device(device, local_rank)
    if world_size == 1:
        return Distributed(0, 1, here, owns_group=False)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    backend = "nccl" if here.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Distributed(rank, world_size, here, owns_group=True)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of every random draw of ``step`` on ``rank`` (crops, quantizer dropout, code
    re-seeding), so a resumed run draws what the uninterrupted one would have."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def batch_indices(
    step: int, n_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """The items of ``step`` on ``rank``: epoch ``e`` permutes all items with seed ``(seed, e)``
    and gives each rank every ``world_size``-th of them (as DistributedSampler does), so the data
    order is a function of the step alone and the ranks' shards are disjoint."""
    per_rank = n_items // world_size
    if per_rank < 1:
        raise VqkitError(f"{n_items} training items cannot be shared among {world_size} processes")
    per_epoch = max(per_rank // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    )
    order = torch.randperm(n_items, generator=generator)[rank::world_size][:per_rank]
    # a shard smaller than a batch wraps around (its items get different random crops)
    picks = (position * batch_size + torch.arange(batch_size)) % per_rank
    return order[picks].tolist()
