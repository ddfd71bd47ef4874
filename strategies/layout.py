"""The facts the engine and the cost model share: what a layout is, the named ones, and how p devices split a model.

A layout (``Layout``) says, for one transformer layer, in which state the residual stream lives (REP: every device
holds every token; TOK: each device holds its token shard) and how each matrix and attention run (``Mode``, ``Attn``).
Wherever a producer leaves its activations in a state the consumer cannot use, the one collective in
``TRANSITIONS`` converts them: the cost model (``cost/layouts.py``) prices exactly those collectives and
the executor (``strategies/executor.py``) issues exactly those, so a layout is the unit both price and run. The three
named strategies are three named layouts; any other valid label runs too.

The device split is one rule shared by the engine (which shards weights by it) and the cost model (which costs the
padded shape), so a plan is never made for a split the engine would refuse, and padded heads are paid for in the
prediction too. Both import this module; neither imports the other's internals.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel, ConfigDict

from strategies.shapes import ModelShape

REP, TOK, FEAT, PSUM = "REP", "TOK", "FEAT", "PSUM"
RESIDUAL_STATES = (REP, TOK)

# (from, to) -> the collective that converts; absent pairs are free (same state, or a local slice of REP).
TRANSITIONS: dict[tuple[str, str], str] = {
    (TOK, REP): "all_gather", (FEAT, REP): "all_gather", (TOK, FEAT): "all_to_all", (FEAT, TOK): "all_to_all",
    (PSUM, REP): "all_reduce", (PSUM, TOK): "reduce_scatter", (PSUM, FEAT): "reduce_scatter",
}


class Mode(str, Enum):
    """How one matrix Y = X·W runs on p devices."""

    COL = "col"  # column-parallel: W split by output features; X replicated
    ROW = "row"  # row-parallel: W split by input features; partial sums out
    GATHERED = "gathered"  # weight-gathered: tokens split, full W all-gathered (prefetched) from the shards
    REPLICATED = "replicated"  # replicated W resident, tokens split
    REDUNDANT = "redundant"  # replicated W, every device computes every token


NEEDS = {Mode.COL: REP, Mode.ROW: FEAT, Mode.GATHERED: TOK, Mode.REPLICATED: TOK, Mode.REDUNDANT: REP}
GIVES = {Mode.COL: FEAT, Mode.ROW: PSUM, Mode.GATHERED: TOK, Mode.REPLICATED: TOK, Mode.REDUNDANT: REP}
FULL_WEIGHT = (Mode.GATHERED, Mode.REPLICATED, Mode.REDUNDANT)  # modes that compute with the whole matrix
HELD_WHOLE = (Mode.REPLICATED, Mode.REDUNDANT)  # modes that keep the whole matrix resident


class Attn(str, Enum):
    """Where attention runs: by head (free), by token (needs the other tokens' K/V: all-gather), or everywhere."""

    HEADS = "heads"
    TOKENS = "tokens"
    REDUNDANT = "redundant"


ATTN_STATE = {Attn.HEADS: FEAT, Attn.TOKENS: TOK, Attn.REDUNDANT: REP}
MATRICES = ("qkv", "o", "gate_up", "down")
# The resident Megatron shards split qkv and gate_up by output features and o and down by input features; a matrix
# run split the other way (``transposed``) needs a second, re-sliced shard of it.
SPLIT_BY_OUTPUT = ("qkv", "gate_up")
FIELDS = ("residual", "attn", *MATRICES)


def adjacent(matrices: list[str]) -> bool:
    """Whether these matrices sit next to each other in a layer's flat shard buffer (in ``MATRICES`` order), so one
    collective can send them without packing."""
    at = [MATRICES.index(m) for m in matrices]
    return at == list(range(at[0], at[0] + len(at)))


def transposed(matrix: str, mode: Mode) -> bool:
    """True when ``mode`` splits ``matrix`` along the other axis than its resident shard (qkv/gate_up by rows of the
    input, o/down by output features)."""
    return mode is (Mode.ROW if matrix in SPLIT_BY_OUTPUT else Mode.COL)


@dataclass(frozen=True, slots=True)
class Layout:
    """One partitioning of a layer: the residual stream's state, and a mode per matrix and for attention."""

    residual: str
    qkv: Mode
    attn: Attn
    o: Mode
    gate_up: Mode
    down: Mode

    @property
    def label(self) -> str:
        return (f"residual={self.residual} qkv={self.qkv.value} attn={self.attn.value} o={self.o.value} "
                f"gate_up={self.gate_up.value} down={self.down.value}")

    def modes(self) -> dict[str, Mode]:
        return {m: getattr(self, m) for m in MATRICES}

    @property
    def name(self) -> str:
        """The strategy name where this is a named layout, else its label: how engine, API and metrics call it."""
        return _NAME_OF.get(self, self.label)


# The named layouts, in the order tables list them. Decode always runs ``megatron``.
NAMED_LAYOUTS: dict[str, Layout] = {
    "megatron": Layout(REP, Mode.COL, Attn.HEADS, Mode.ROW, Mode.COL, Mode.ROW),
    "weight_gathered": Layout(TOK, Mode.GATHERED, Attn.TOKENS, Mode.GATHERED, Mode.GATHERED, Mode.GATHERED),
    "projection_replicated": Layout(TOK, Mode.REPLICATED, Attn.TOKENS, Mode.REPLICATED, Mode.REPLICATED,
                                       Mode.REPLICATED),
}
_NAME_OF = {c: n for n, c in NAMED_LAYOUTS.items()}
STRATEGY_NAMES: tuple[str, ...] = tuple(NAMED_LAYOUTS)
MEGATRON = NAMED_LAYOUTS["megatron"]


@functools.lru_cache(maxsize=4096)  # a label arrives with every request; parsing it once is enough
def parse_layout(text: str, error: type[ValueError] = ValueError) -> Layout:
    """A strategy name or a layout label as ``dynpart search`` prints it (fields in any order), or ``error`` naming
    the bad field."""
    text = text.strip()
    if text in NAMED_LAYOUTS:
        return NAMED_LAYOUTS[text]
    if "=" not in text:
        raise error(f"unknown prefill strategy {text!r}: choose one of {', '.join(STRATEGY_NAMES)}, or a layout "
                    f"label such as {MEGATRON.label!r}")
    fields: dict[str, str] = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if not sep or key not in FIELDS:
            raise error(f"layout {text!r}: {part!r} is not a field; the fields are {', '.join(FIELDS)}")
        if key in fields:
            raise error(f"layout {text!r}: field {key!r} given twice")
        fields[key] = value
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise error(f"layout {text!r}: missing field(s) {', '.join(missing)}")
    if fields["residual"].upper() not in RESIDUAL_STATES:
        raise error(f"layout field 'residual': {fields['residual']!r} is not one of {', '.join(RESIDUAL_STATES)}")
    values = {"residual": fields["residual"].upper()}
    for key, enum in (("attn", Attn), *((m, Mode) for m in MATRICES)):
        try:
            values[key] = enum(fields[key].lower())
        except ValueError:
            raise error(f"layout field {key!r}: {fields[key]!r} is not one of "
                        f"{', '.join(e.value for e in enum)}") from None
    return Layout(**values)


def check_strategy(name: str, allow_auto: bool = False, error: type[ValueError] = ValueError) -> str:
    """The one check of a prefill strategy (a name or any layout label; ``auto``, the planner's choice, where the
    caller resolves it): its canonical name (the strategy name for a named layout's label)."""
    if allow_auto and name == "auto":
        return name
    return parse_layout(name, error).name


def token_chunk(total: int, devices: int) -> int:
    """Rows per rank when ``total`` packed tokens are token-sharded: two zigzag chunks, padded to a multiple of 2p."""
    return 2 * max(1, -(-total // (2 * devices)))


def feature_width(width: int, devices: int) -> int:
    """A width split by features over p devices, padded up to a multiple of p with zero features (exact)."""
    return -(-width // devices) * devices


class DeviceSplit(BaseModel):
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


def check_devices(shape: ModelShape, p: int) -> DeviceSplit:
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
    return DeviceSplit(devices=p, heads=heads, kv_heads=kv, kv_replication=rep, intermediate=f)
