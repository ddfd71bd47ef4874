"""Turn engine options into a running engine: shard workers, tokenizer, and the planner as strategy chooser."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from app.engine.llm_engine import LLMEngine
from placement.hardware import detect_hardware, replica_budget_bytes
from placement.workers import COLLECTIVE_TIMEOUT_S, max_devices, start_group
from strategies.cost import decode_step_time, get_hardware, plan_prefill
from strategies.layout import check_devices
from strategies.loader import DEFAULT_MODEL, DTYPES, Checkpoint
from strategies.shapes import DtypeName


class EngineFields(BaseModel):
    """The engine settings a pool's config (``app.serve.config.PoolConfig``) and the CLI share, with their bounds."""

    model_config = ConfigDict(extra="forbid")

    devices: int = Field(1, ge=1)  # devices (shard workers) per replica
    slots: int = Field(8, ge=1, le=256)  # sequences decoded together
    max_model_len: int = Field(2048, ge=16)  # prompt + generated tokens per sequence
    max_prefill_tokens: int = Field(8192, ge=16)  # prompt tokens one prefill batch may hold
    dtype: DtypeName = "float32"
    # Cores one device's rank uses (CPU devices run that many torch threads, whole cores, at least one; ranks with
    # less than a core share one, and the planner prices them so). Ray counts them, so it never places more engines
    # on a node than its cores can run; a GPU device needs a core to drive it.
    cpus_per_device: float = Field(1.0, gt=0)
    # A step whose peer rank died or hangs fails after this long (the replica is then replaced): the longest a
    # request on a broken replica waits for its error. Rendezvous at start-up gets the same bound.
    collective_timeout_s: float = Field(COLLECTIVE_TIMEOUT_S, gt=0)


class EngineOptions(EngineFields):
    """Everything ``build_engine`` needs: the shared fields, the model, and how the planner prices the devices."""

    model: str = DEFAULT_MODEL
    hardware: str | None = None  # catalog name for the planner; detected when None
    replica_budget_mb: float | None = None  # memory per device for projection_replicated; auto when None
    shared_weights: bool = False  # map the node's one copy of the shards (object store) instead of loading them


def validate_devices(opts: EngineOptions, ckpt: Checkpoint) -> None:
    """Refuse a device count before any worker starts: beyond this machine, or one that cannot split the model."""
    limit = max_devices()
    if opts.devices > limit:
        raise ValueError(f"--devices {opts.devices} is more than this machine offers ({limit})")
    check_devices(ckpt.shape, opts.devices)


def build_engine(opts: EngineOptions, placement_group=None, bundle: dict | None = None,
                 engine_class: type[LLMEngine] = LLMEngine) -> LLMEngine:
    """``bundle``: what one device of ``placement_group`` offers (default: detected); ``engine_class``: an
    ``LLMEngine`` subclass, e.g. the prefill-only or decode-only engine of a disaggregated pool."""
    ckpt = Checkpoint(opts.model)
    validate_devices(opts, ckpt)
    tokenizer = ckpt.tokenizer()  # fail on a missing tokenizer before any worker starts
    capacity = min(opts.max_model_len, ckpt.shape.max_position_embeddings)
    budget = (int(opts.replica_budget_mb * 2**20) if opts.replica_budget_mb is not None
              else replica_budget_bytes(opts.devices))
    runner_kwargs = dict(model=str(ckpt.path), slots=opts.slots, capacity=capacity, dtype=DTYPES[opts.dtype],
                         replica_budget_bytes=budget)
    if opts.shared_weights:
        runner_kwargs["shared_weights"] = True
    group = start_group(opts.devices, runner_kwargs, placement_group=placement_group, bundle=bundle,
                        collective_timeout_s=opts.collective_timeout_s)
    available = group.call("available_strategies")
    name = opts.hardware or detect_hardware()
    hardware = get_hardware(name) if torch.cuda.is_available() else get_hardware(name).time_shared(
        opts.cpus_per_device)

    def choose(lengths: list[int]) -> str:
        return plan_prefill(ckpt.shape, hardware, opts.devices, lengths, available=available).strategy

    def predict_prefill_s(tokens: int) -> float:
        return plan_prefill(ckpt.shape, hardware, opts.devices, tokens, available=available).time_s

    step_s = decode_step_time(ckpt.shape, hardware, opts.devices, [capacity // 2] * opts.slots)
    return engine_class(group, tokenizer, ckpt.eos_token_ids(), slots=opts.slots, capacity=capacity,
                        choose_strategy=choose, max_prefill_tokens=opts.max_prefill_tokens,
                        predict_prefill_s=predict_prefill_s, step_s=step_s)
