"""DistributedDataParallel plumbing for training under ``torchrun`` (or one plain process).

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` we join the
process group (NCCL on CUDA, gloo on CPU). Every rank takes an equal share of each epoch's
batches (the remainder is dropped so collectives never wait on a rank with nothing left), and
only rank 0 logs, tracks and writes checkpoints.

Under torchrun's elastic agent (``--max-restarts``, several nodes) a failed worker group is
restarted as a whole, possibly with replaced nodes: ``TORCHELASTIC_RESTART_COUNT`` says how
many times this node's agent restarted it.
``restarted`` tells every rank whether the group is such a restart, so that training resumes
from its last checkpoint instead of starting afresh.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: its rank among ``world_size``, its rank on its node,
    and, under torchrun's elastic agent, how many times that node's agent has restarted the
    worker group (``restart_count``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str) -> DistInfo:
    """Join the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if world <= 1:
        return DistInfo(restart_count=restarts)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), restarts)
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share: every ``world_size``-th item, the same count on every rank."""
    if not info.enabled:
        return list(items)
    n = len(items) // info.world_size
    return list(items[info.rank : n * info.world_size : info.world_size])


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned); a no-op in a single process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (e.g. a stop request that reached one rank first)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def restarted(info: DistInfo, device: torch.device) -> bool:
    """Whether torchrun's elastic agent restarted this worker group after a failure (one
    collective: every rank gets the same answer).

    Each node's agent counts its own restarts, and a node that replaced a failed one starts
    at 0, so the group is a restart when any rank's count is above 0. A group that an agent
    restarts only because nodes joined an elastic range (``--nnodes MIN:MAX``) is not one:
    torchrun does not count those.
    """
    return any_rank(info.restart_count > 0, info, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
