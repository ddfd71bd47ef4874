"""Turn engine options into a running engine: shard workers, tokenizer, and the planner as strategy chooser."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.engine.llm_engine import LLMEngine
from app.engine.predictor import StepPredictor
from placement.group import Group, RunnerSettings
from placement.hardware import detect_hardware
from placement.workers import COLLECTIVE_TIMEOUT_S, max_devices, start_group
from cost import decode_step_time, get_hardware
from cost.correction import Correction, correction_path, correction_stamp
from cost.formulas import Work
from cost.planner import contenders, executable_layouts, memory_row
from strategies.kv_cache import DEFAULT_BLOCK_SIZE
from strategies.layout import STRATEGY_NAMES, check_devices
from strategies.loader import DEFAULT_MODEL, Checkpoint
from strategies.shapes import DtypeChoice, ModelShape


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


def guessed_step_s(shape: ModelShape, hardware, devices: int, max_model_len: int, max_num_seqs: int) -> float:
    """A decode step's seconds before any is measured: the planner's, for up to 8 sequences at half the context (the
    engine's starting figure, and an ingress's until the first load report)."""
    return decode_step_time(shape, hardware, devices, [max_model_len // 2] * min(max_num_seqs, 8))


def validate_devices(opts: EngineOptions, ckpt: Checkpoint) -> None:
    """Refuse a device count before any worker starts: beyond this machine, or one that cannot split the model."""
    limit = max_devices()
    if opts.devices > limit:
        raise ValueError(f"--devices {opts.devices} is more than this machine offers ({limit})")
    check_devices(ckpt.shape, opts.devices)


def build_engine(opts: EngineOptions, placement_group=None, bundle: dict | None = None,
                 engine_class: type[LLMEngine] = LLMEngine, pinned: Sequence[str] = (),
                 pin_here: bool = False) -> LLMEngine:
    """``bundle``: what one device of ``placement_group`` offers (default: detected); ``engine_class``: an
    ``LLMEngine`` subclass, e.g. the prefill-only or decode-only engine of a disaggregated pool. Devices claim cores
    (``placement/cores.py``) in a placement group, or with ``pin_here`` as a replica of ``bundle`` would: a
    benchmark that runs a pool's engine in its own process (a one-device engine pins that process), so two ranks
    of half a core share one core there as they do in the service.

    Every layout a request may name is built here, before any step (a step never builds one): the engine offers
    (``contenders``) the planner's picks plus the named strategies (static policies) and ``pinned`` layouts (the
    CLI's ``--prefill-strategy``) whose replicas fit the budget on every rank; a request naming another is refused."""
    ckpt = Checkpoint(opts.model)
    validate_devices(opts, ckpt)
    tokenizer = ckpt.tokenizer()  # fail on a missing tokenizer before any worker starts
    max_model_len = opts.context(ckpt.shape.max_position_embeddings)
    budget = None if opts.replica_budget_gb is None else int(opts.replica_budget_gb * 1e9)
    kv_gb = kv_budget_gb(opts)
    grouped = placement_group is not None or pin_here
    reserved = bundle.get("CPU", 0.0) if grouped and bundle and opts.pin_cores else 0.0
    settings = RunnerSettings(model=str(ckpt.path), dtype=opts.dtype, replica_budget_bytes=budget,
                              kv_reserve_bytes=int((kv_gb or 0) * 1e9), block_size=opts.block_size,
                              shared_weights=opts.shared_weights, pin_cpus=reserved)
    group = start_group(opts.devices, settings, placement_group=placement_group, bundle=bundle,
                        collective_timeout_s=opts.collective_timeout_s)
    name = opts.hardware or detect_hardware()
    hardware = get_hardware(name) if torch.cuda.is_available() else get_hardware(name).time_shared(
        opts.cpus_per_device)
    layouts = (executable_layouts(ckpt.shape, hardware, opts.devices) if opts.prefill_layouts == "front"
               else list(STRATEGY_NAMES))
    extra = [s for s in dict.fromkeys(pinned) if s != "auto" and s not in layouts]
    fit = group.fitting([*layouts, *extra])  # every rank builds the same replicas: what fits on all
    available = [s for s in [*layouts, *extra] if all(s in f for f in fit)]
    num_blocks = allocate_kv(group, opts, ckpt.shape, hardware, available, kv_gb, max_model_len)
    picks = contenders(ckpt.shape, hardware, opts.devices, [s for s in available if s not in extra],
                       opts.max_num_batched_tokens)
    offered = list(dict.fromkeys([*picks, *(s for s in available if s in STRATEGY_NAMES or s in pinned)]))

    predictor = (StepPredictor(ckpt.shape, hardware, opts.devices, picks, *learned(hardware, ckpt, opts.devices))
                 if opts.online_correction else StepPredictor(ckpt.shape, hardware, opts.devices, picks, learns=False))
    step_s = guessed_step_s(ckpt.shape, hardware, opts.devices, max_model_len, opts.max_num_seqs)
    return engine_class(group, tokenizer, ckpt.eos_token_ids(), num_blocks=num_blocks, block_size=opts.block_size,
                        max_model_len=max_model_len, max_num_seqs=opts.max_num_seqs,
                        max_num_batched_tokens=opts.max_num_batched_tokens,
                        enable_chunked_prefill=opts.enable_chunked_prefill,
                        enable_prefix_caching=opts.enable_prefix_caching, predictor=predictor, step_s=step_s,
                        tpot_s=opts.sized_tpot_s(), ttft_s=opts.ttft_s,
                        layouts=available, contenders=offered, watchdog_floor_s=opts.step_watchdog_floor_s)


def learned(hardware, ckpt: Checkpoint, devices: int) -> tuple[Correction, Path]:
    """The correction this pool's engines learned before (saved beside the calibration profile), and where to save
    it; a fresh one when the hardware's figures (a new calibration), the model or p changed since."""
    shape = ckpt.shape.model_dump_json()
    path = correction_path(hardware, f"{ckpt.shape.name}-{hashlib.sha256(shape.encode()).hexdigest()[:8]}", devices)
    stamp = correction_stamp(hardware, shape, devices)
    return Correction.load(path, stamp), path


def kv_budget_gb(opts: EngineFields) -> float | None:
    """KV cache per device: as set, else on a CPU the default, else None (each GPU worker measures what is free)."""
    if opts.kv_cache_memory_gb is None and not torch.cuda.is_available():
        return DEFAULT_CPU_KV_CACHE_GB
    return opts.kv_cache_memory_gb


def allocate_kv(group: Group, opts: EngineOptions, shape: ModelShape, hardware, available: list[str], gb: float | None,
                max_model_len: int) -> int:
    """Size the KV cache on every rank and allocate it: the strategies' resident buffers first, then what each rank
    can hold (``gb`` per device, or a GPU's measured free memory less the activations of a full step as the cost
    model sizes them), the smallest over ranks."""
    group.prepare(available)
    work = Work.prefill(opts.max_num_batched_tokens)
    reserve = max(memory_row(s, shape, hardware, opts.devices, work).workspace_gb for s in available)
    fits = group.kv_blocks_fit(None if gb is None else int(gb * 1e9), opts.gpu_memory_utilization,
                               int(reserve * 1e9))
    blocks = min(fits)
    if blocks * opts.block_size < max_model_len:
        raise ValueError(f"the KV cache holds {blocks} blocks of {opts.block_size} tokens per device, less than one "
                         f"sequence of max_model_len={opts.max_model_len}: raise kv_cache_memory_gb or lower "
                         "max_model_len")
    group.allocate_kv(blocks)
    return blocks
