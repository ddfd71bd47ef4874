"""The collectives interface the partitioned model math calls, and its one-device implementation.

Every collective a layout causes is one visible method call on a ``Comm``: ``all_reduce`` (partial sums into
replicated activations), ``all_gather`` (K/V, weights, logits, token or feature shards), ``reduce_scatter`` (partial
sums into token or feature shards), ``all_to_all`` (token shards ↔ feature shards). ``CountingComm`` records what a
pass really issues, so a test can hold the cost model's op lists to it. The model code sees only this interface;
``SingleDevice`` runs the same code on one device with no process group at all, and
``placement.collectives.ProcessGroupComm`` implements it over torch.distributed (nccl on GPUs, gloo on CPU), so the
math never imports the floor that starts processes.
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
    def all_to_all(self, x: torch.Tensor) -> torch.Tensor: ...


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

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CountingComm:
    """Wraps a ``Comm`` and records every collective as (kind, bytes of the whole tensor), the size the cost model's
    ``Collective`` ops carry: an all-gather's output, an all-reduce's tensor, a reduce-scatter's or all-to-all's
    input summed over the p ranks."""

    def __init__(self, inner: Comm):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.calls: list[tuple[str, int]] = []

    def _log(self, kind: str, x: torch.Tensor, ranks: int) -> None:
        self.calls.append((kind, x.numel() * x.element_size() * ranks))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._log("all_reduce", x, 1)
        return self.inner.all_reduce(x)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self._log("all_gather", x, self.world_size)
        return self.inner.all_gather(x)

    def all_gather_async(self, x: torch.Tensor, out: torch.Tensor | None = None) -> PendingGather:
        self._log("all_gather", x, self.world_size)
        return self.inner.all_gather_async(x, out)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        self._log("reduce_scatter", x, 1)
        return self.inner.reduce_scatter(x)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        self._log("all_to_all", x, self.world_size)
        return self.inner.all_to_all(x)
