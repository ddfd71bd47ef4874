"""The settings of an engine: what a pool's config and the CLI may set, with their bounds and defaults.

Without torch: the ingress validates pools with them (``app.serve.config``); ``build.py`` turns them into an engine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from placement.bundles import COLLECTIVE_TIMEOUT_S
from strategies.shapes import DEFAULT_BLOCK_SIZE, DEFAULT_MODEL, DtypeChoice

DEFAULT_CPU_KV_CACHE_GB = 0.5  # a CPU device's KV budget when none is set (host memory is not measured)


class EngineFields(BaseModel):
    """The engine settings a pool's config (``app.serve.config.PoolConfig``) and the CLI share, with their bounds."""

    model_config = ConfigDict(extra="forbid")

    devices: int = Field(1, ge=1)  # devices (shard workers) per replica
    max_num_seqs: int = Field(64, ge=1, le=4096)  # sequences a replica runs at once (as KV memory allows)
    max_model_len: int = Field(2048, ge=16)  # prompt + generated tokens per sequence
    # Tokens one step computes: every decoding sequence's next token plus prefill chunks up to this budget.
    max_num_batched_tokens: int = Field(2048, ge=16)
    # How a step's prefill tokens are sized: "slo", the most whose predicted step keeps the decoding streams within
    # ``tpot_s`` (``app/engine/step_budget.py``; ``max_num_batched_tokens`` the cap); "fixed": max_num_batched_tokens.
    # None: "slo" when there is a TPOT target (a pool's ``slo.tpot_s`` or ``tpot_s``), else "fixed".
    step_budget: Literal["slo", "fixed"] | None = None
    tpot_s: float | None = Field(None, gt=0)  # the TPOT target steps are sized for (a pool's ``slo.tpot_s`` by default)
    # the TTFT target a prompt read beside streams is hurried to meet: its chunks at least what reads it by then at
    # one step per tpot_s (a pool's ``slo.ttft_s`` by default; None: one block per step at least)
    ttft_s: float | None = Field(None, gt=0)
    enable_chunked_prefill: bool = True  # long prompts in chunks between decode steps (else whole, stalling them)
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    # Correct the planner's predictions by the steps this engine measures (cost.correction); off: the planner as
    # calibrated, every choice reproducible from the profile alone (dynpart plan / bench accuracy show them)
    online_correction: bool = True
    block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=1, le=256)  # tokens per KV block
    # KV cache per device. None: on a GPU, what is free after the weights, up to gpu_memory_utilization of the card
    # (measured on each device); on a CPU, DEFAULT_CPU_KV_CACHE_GB.
    kv_cache_memory_gb: float | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    # Memory per device projection_replicated's replicas may take. None: measured in each worker once its shards are
    # loaded (a quarter of its free GPU memory, or of the host's available memory per device), less the KV budget.
    replica_budget_gb: float | None = Field(None, ge=0)
    # Layouts prefill may use: "front", the named strategies and every member of the Pareto front for this model and
    # device count (those whose replicas fit the budget together, in order of the search's ranking); "named", only the
    # three named strategies.
    prefill_layouts: Literal["front", "named"] = "front"
    # Weights, activations and KV cache. "auto": bfloat16 where the device multiplies it natively (GPUs; CPUs with AMX
    # or AVX512-BF16), else float32 (``placement.hardware.fast_dtype``, decided in each worker). float32 is the one
    # exact against transformers (logits within 1e-4); bfloat16 agrees with transformers run in bfloat16.
    dtype: DtypeChoice = "auto"
    # Cores one device's rank uses (CPU devices run that many torch threads, whole cores, at least one; ranks with
    # less than a core share one, and the planner prices them so). Ray counts them, so it never places more engines
    # on a node than its cores can run; a GPU device needs a core to drive it.
    cpus_per_device: float = Field(1.0, gt=0)
    # A CPU device that Ray reserved cores for (a Serve replica's) computes on cores it claims on the node: whole cores
    # alone, a fraction on a core it shares with other fractions and the service's processes, never with a whole-core
    # device (placement/cores.py; the OS otherwise time-slices the engine with everything else). false: unpinned.
    pin_cores: bool = True
    # A step whose peer rank died or hangs fails after this long (the replica is then replaced): the longest a
    # request on a broken replica waits for its error. Rendezvous at start-up gets the same bound.
    collective_timeout_s: float = Field(COLLECTIVE_TIMEOUT_S, gt=0)
    # A step running past 10× its predicted time, and at least this long, means a hung worker (SIGSTOP, a stuck
    # collective; one device has no collective to time out): its requests fail and the replica is replaced.
    step_watchdog_floor_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _step_budget(self) -> EngineFields:
        """An SLO budget needs a target to size for and chunks to size: an error, not a silent fixed budget."""
        if self.step_budget == "slo" and self.tpot_s is None:
            raise ValueError("step_budget: slo sizes each step by a TPOT target: set tpot_s (a pool's slo.tpot_s)")
        if self.step_budget == "slo" and not self.enable_chunked_prefill:
            raise ValueError("step_budget: slo sizes prefill chunks: it needs enable_chunked_prefill: true")
        return self

    def sized_tpot_s(self) -> float | None:
        """The TPOT target each step is sized for, None for the fixed budget."""
        fixed = self.step_budget == "fixed" or not self.enable_chunked_prefill
        return None if fixed else self.tpot_s

    def context(self, max_position_embeddings: int) -> int:
        """Tokens one sequence may hold (prompt + generated): ``max_model_len``, at most the model's positions."""
        return min(self.max_model_len, max_position_embeddings)


class EngineOptions(EngineFields):
    """Everything ``build_engine`` needs: the shared fields, the model, and how the planner prices the devices."""

    model: str = DEFAULT_MODEL
    hardware: str | None = None  # catalog name for the planner; detected when None
    shared_weights: bool = False  # map the node's one copy of the shards (object store) instead of loading them
