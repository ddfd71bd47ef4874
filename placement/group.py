"""What the engine drives: a group of p ranks running the same ``ShardRunner`` method together (SPMD), and the
settings each rank builds its runner from.

The engine and the tools call typed methods (``step``, ``forward``, ``fitting``, ...), one per runner method they
use, so a renamed or re-typed runner method fails where it is called, not in a worker; the method's name as a string
lives only in ``call`` / ``call_all``, which each group kind implements (``placement.workers``: ``LocalGroup`` in the
calling process, ``ShardGroup`` over Ray actors).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from strategies.kv_cache import Chunk
from strategies.dtypes import DTYPES
from strategies.shapes import DEFAULT_BLOCK_SIZE


class RunnerSettings(BaseModel):
    """What every rank builds its ``ShardRunner`` from: sent to each worker at start and again by ``load``, so it is
    one checked, picklable value rather than loose keyword arguments (a misspelt key fails here, in the caller, not
    as a worker's start-up error). Callers that still hold a dict pass it anywhere a ``RunnerSettings`` is taken."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    model: str  # a checkpoint folder (``Checkpoint``'s path)
    dtype: torch.dtype | Literal["auto"] = torch.float32  # "auto": each worker picks for its device (fast_dtype)
    block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=1)  # tokens per KV block
    num_blocks: int | None = Field(None, ge=0)  # KV blocks allocated at start; None (or 0): later, by ``allocate_kv``
    balanced: bool = True  # zigzag token shards (False: contiguous, the benchmark's baseline)
    # Memory per device the layouts' replicas may take; None: measured in each worker once its shards are loaded,
    # less ``kv_reserve_bytes`` (what the KV cache was promised: ``placement.hardware.replica_budget_bytes``)
    replica_budget_bytes: int | None = Field(0, ge=0)
    kv_reserve_bytes: int = Field(0, ge=0)
    shared_weights: bool = False  # map the node's one copy of the rank's shards (object store) instead of loading
    pack_weights: bool = True  # prepack the shards for the CPU's GEMM (strategies/packed.py; two private copies each)
    # Cores the rank's device reserved (its bundle's CPU): its process claims and is pinned to that many cores of the
    # node (placement/cores.py); 0: the OS places it (no reservation: tools, tests)
    pin_cpus: float = Field(0.0, ge=0)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_by_name(cls, v: Any) -> torch.dtype:
        return DTYPES[v] if isinstance(v, str) and v != "auto" else v

    @classmethod
    def of(cls, settings: RunnerSettings | dict) -> RunnerSettings:
        return settings if isinstance(settings, RunnerSettings) else cls.model_validate(settings)


class Group(ABC):
    """What the engine drives: p ranks that run the same ``ShardRunner`` method together (SPMD).

    Each runner method the driver calls has its typed method here; ``call`` / ``call_all`` (by name) are how a
    group reaches its ranks, and the only place a method is named by a string."""

    devices: int

    @abstractmethod
    def call(self, method: str, *args: Any) -> Any:
        """Run a runner method on every rank at once; rank 0's answer."""
    @abstractmethod
    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Run a runner method on every rank at once; every rank's answer, in rank order."""
    @abstractmethod
    def put_kv(self, tables: list[tuple[list[int], int]]) -> list[list]:
        """Each rank's K/V of sequences (block table, length) as an object reference ([rank][0]), for ``take_kv``
        in another group."""
    @abstractmethod
    def take_kv(self, tables: list[list[int]], refs_by_rank: list[list]) -> None:
        """Adopt K/V that a group of as many ranks ``put_kv`` into these block tables: rank r fetches rank r's."""
    @abstractmethod
    def calibrate(self, spec: dict) -> list[dict]:
        """Measure GEMMs, attention, memory and collectives on every rank at once (``dynpart calibrate``); per rank."""
    @abstractmethod
    def pids(self) -> list[int]:
        """The processes that hold the ranks besides the caller's (empty when the runner is in the caller)."""
    @abstractmethod
    def shutdown(self) -> None:
        """Stop the ranks and free their devices."""

    # -- a step ----------------------------------------------------------------------------------------------------

    def step(self, parts: list[tuple[str, list[Chunk]]]) -> torch.Tensor:
        """An engine step (``ShardRunner.step``): each part's chunks by its strategy; logits of each chunk's last
        token, in order [B, V]."""
        return self.call("step", parts)

    def forward(self, chunks: list[Chunk], strategy: str = "megatron", all_logits: bool = False) -> torch.Tensor:
        """One pass over ``chunks`` by ``strategy`` (``ShardRunner.forward``): last-token logits [B, V], or every
        token's [T, V]."""
        return self.call("forward", chunks, strategy, all_logits)

    def collectives(self, chunks: list[Chunk], strategy: str) -> tuple[torch.Tensor, list[tuple[str, int]]]:
        """A pass's logits and the collectives it issued, as (kind, bytes) (``ShardRunner.collectives``)."""
        return self.call("collectives", chunks, strategy)

    # -- layouts and memory, at start ------------------------------------------------------------------------------

    def fitting(self, strategies: list[str]) -> list[list[str]]:
        """Per rank, the run of ``strategies`` whose replicas fit its budget together (nothing is built)."""
        return self.call_all("fitting", strategies)

    def prepare(self, strategies: list[str]) -> None:
        """Build on every rank what these layouts keep resident, before KV memory is measured."""
        self.call_all("prepare", strategies)

    def available_strategies(self, layouts: list[str] | None = None) -> list[str]:
        """Those of ``layouts`` (default: the named ones) whose replicas fit rank 0's budget, each alone."""
        return self.call("available_strategies", layouts)

    def kv_blocks_fit(self, budget_bytes: int | None, utilization: float = 0.9, reserve_bytes: int = 0) -> list[int]:
        """Per rank, the KV blocks it can hold (``ShardRunner.kv_blocks_fit``): the engine takes the smallest."""
        return self.call_all("kv_blocks_fit", budget_bytes, utilization, reserve_bytes)

    def allocate_kv(self, num_blocks: int) -> None:
        """(Re)allocate every rank's KV cache with ``num_blocks`` blocks (the same on every rank)."""
        self.call_all("allocate_kv", num_blocks)

    def kv_block_bytes(self) -> list[int]:
        """Per rank, the bytes of one KV block (its own KV heads)."""
        return self.call_all("kv_block_bytes")

    def dtype_name(self) -> str:
        """The dtype the ranks compute in (``dtype: auto`` resolved where the weights live; one device kind per
        replica, so rank 0's)."""
        return self.call("dtype_name")

    def memory_report(self) -> list[dict[str, int]]:
        """Per rank, the bytes it holds: weights, gather buffers, replicas, KV cache."""
        return self.call_all("memory_report")

    # -- K/V between replicas of one process (tests; replicas use ``put_kv``/``take_kv``) -------------------------

    def export_kv(self, tables: list[tuple[list[int], int]]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Rank 0's head-sharded K/V of sequences (block table, length)."""
        return self.call("export_kv", tables)

    def import_kv(self, tables: list[list[int]], kv: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Adopt K/V ``export_kv`` gave into these block tables (one rank)."""
        self.call("import_kv", tables, kv)
