"""The facts the engine and the cost model share: the prefill strategies' names, and how p devices split a model.

One rule shared by the engine (which shards weights by it) and the cost model (which costs the padded shape), so a
plan is never made for a split the engine would refuse, and padded heads are paid for in the prediction too. Both
import this module; neither imports the other's internals.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from strategies.shapes import ModelShape

# The prefill strategies the engine executes, in the order tables list them. Decode always runs ``megatron``.
STRATEGY_NAMES: tuple[str, ...] = ("megatron", "weight_gathered", "projection_replicated")


def check_strategy(name: str, allow_auto: bool = False, error: type[ValueError] = ValueError) -> str:
    """The one check of a prefill strategy name (``auto``, the planner's choice, where the caller resolves it)."""
    choices = (["auto"] if allow_auto else []) + list(STRATEGY_NAMES)
    if name not in choices:
        raise error(f"unknown prefill strategy {name!r}: choose one of {', '.join(choices)}")
    return name


class ShardLayout(BaseModel):
    """How a model's heads and MLP split over ``devices``: totals across all devices, after padding/replication.

    - Query and KV heads are padded with zero heads (exact) so each device holds the same number, keeping each KV
      head's group of query heads on one device.
    - When p > KV heads and p is a multiple of them (and the query heads divide by p), KV heads are replicated
      instead, as vLLM does: ``kv_replication`` devices hold a copy of each.
    - The MLP's intermediate size is padded with zero columns to a multiple of p (exact: silu(0)·0 = 0).
    """

    model_config = ConfigDict(frozen=True)
    devices: int
    heads: int
    kv_heads: int  # stored KV heads summed over devices, replicas counted
    kv_replication: int
    intermediate: int

    @property
    def heads_per_device(self) -> int:
        return self.heads // self.devices

    @property
    def kv_heads_per_device(self) -> int:
        return self.kv_heads // self.devices

    def padded_shape(self, shape: ModelShape) -> ModelShape:
        """The shape the devices compute with (padded heads and MLP); what the cost model should cost."""
        return shape.model_copy(update={"num_heads": self.heads, "num_kv_heads": self.kv_heads,
                                        "intermediate_size": self.intermediate})


def check_devices(shape: ModelShape, p: int) -> ShardLayout:
    """The shard layout for p devices, or ValueError saying why p cannot split this model."""
    if isinstance(p, bool) or not isinstance(p, int):
        raise ValueError(f"devices must be a whole number, got {p!r}")
    if p < 1:
        raise ValueError(f"devices must be at least 1, got {p}")
    h, hkv = shape.num_heads, shape.num_kv_heads
    if p > h:
        raise ValueError(f"{shape.name} has {h} query heads: it cannot be split over {p} devices (at most {h})")
    if h % hkv:
        raise ValueError(f"{shape.name}: {h} query heads are not a multiple of {hkv} KV heads")
    group = h // hkv
    if hkv % p == 0:
        kv, rep, heads = hkv, 1, h
    elif p % hkv == 0 and h % p == 0:
        kv, rep, heads = p, p // hkv, h
    else:
        kv_pad = -(-hkv // p) * p
        kv, rep, heads = kv_pad, 1, kv_pad * group
    f = -(-shape.intermediate_size // p) * p
    return ShardLayout(devices=p, heads=heads, kv_heads=kv, kv_replication=rep, intermediate=f)
