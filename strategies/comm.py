"""The collectives interface the partitioned model math calls, and its one-device implementation.

Every collective a strategy causes is one visible method call on a ``Comm``: ``all_reduce`` (Megatron's
row-parallel outputs), ``all_gather`` (K/V, weights, logits), ``reduce_scatter`` (vocab-parallel embedding into
token shards). The model code sees only this interface; ``SingleDevice`` runs the same code on one device with no
process group at all, and ``placement.collectives.ProcessGroupComm`` implements it over torch.distributed (nccl on
GPUs, gloo on CPU), so the math never imports the floor that starts processes.
"""

from __future__ import annotations

from typing import Protocol

import torch


class PendingGather(Protocol):
    def wait(self) -> torch.Tensor: ...


class Comm(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...
    def all_gather(self, x: torch.Tensor) -> torch.Tensor: ...
    def all_gather_async(self, x: torch.Tensor, out: torch.Tensor | None = None) -> PendingGather: ...
    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor: ...


class FinishedGather:
    """A gather that is already complete (one device): ``wait`` returns its value."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value


class SingleDevice:
    """p = 1: every collective is the identity (stacked along a new leading dim of size 1 for gathers)."""

    rank = 0
    world_size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0)

    def all_gather_async(self, x: torch.Tensor, out: torch.Tensor | None = None) -> PendingGather:
        return FinishedGather(x.unsqueeze(0))

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return x[0]
