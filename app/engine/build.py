"""Turn engine options into a running engine: shard workers, tokenizer, and the planner as strategy chooser."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from app.engine.llm_engine import LLMEngine
from app.engine.options import DEFAULT_CPU_KV_CACHE_GB, EngineFields, EngineOptions
from app.engine.predictor import StepPredictor, guessed_step_s
from placement.group import Group, RunnerSettings
from placement.hardware import detect_hardware
from placement.workers import max_devices, start_group
from cost import get_hardware
from cost.correction import Correction, correction_path, correction_stamp
from cost.formulas import Work
from cost.planner import contenders, executable_layouts, memory_row
from strategies.layout import STRATEGY_NAMES, check_devices
from strategies.loader import Checkpoint
from strategies.shapes import ModelShape


def validate_devices(opts: EngineOptions, ckpt: Checkpoint) -> None:
    """Refuse a device count before any worker starts: beyond this machine, or one that cannot split the model."""
    limit = max_devices()
    if opts.devices > limit:
        raise ValueError(f"--devices {opts.devices} is more than this machine offers ({limit})")
    check_devices(ckpt.shape, opts.devices)


def build_engine(opts: EngineOptions, placement_group=None, bundle: dict | None = None,
                 engine_class: type[LLMEngine] = LLMEngine, pinned: Sequence[str] = (),
                 pin_here: bool = False, rank0_here: bool | None = None) -> LLMEngine:
    """``bundle``: what one device of ``placement_group`` offers (default: detected); ``engine_class``: an
    ``LLMEngine`` subclass, e.g. the prefill-only or decode-only engine of a disaggregated pool. Devices claim cores
    (``placement/cores.py``) in a placement group, or with ``pin_here`` as a replica of ``bundle`` would: a
    benchmark that runs a pool's engine in its own process (a one-device engine pins that process), so two ranks
    of half a core share one core there as they do in the service.

    Every layout a request may name is built here, before any step (a step never builds one): the engine offers
    (``contenders``) the planner's picks plus the named strategies (static policies) and ``pinned`` layouts (the
    CLI's ``--prefill-strategy``) whose replicas fit the budget on every rank; a request naming another is refused.
    ``rank0_here``: this process is rank 0 of the engine's group (default: in a placement group, i.e. a replica;
    ``start_group``)."""
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
                        collective_timeout_s=opts.collective_timeout_s, rank0_here=rank0_here)
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
