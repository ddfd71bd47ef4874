"""Pareto search over layer partitionings: enumerate every per-matrix mode, cost it, keep what nothing beats.

This is the thesis's method made explicit. Each candidate is costed per layer on the busiest device: FLOPs,
blocking communication (activation bytes on the critical path), prefetchable communication (weight bytes, which do
not grow with T), latency steps, and resident memory per device. A candidate is dropped when another is no worse on
every one of these at every token count searched and better on one. Candidates with identical costs are one front
member (e.g. Megatron and its sequence-parallel twin); the engine's three strategies are named where they appear.
"""

from __future__ import annotations

import itertools

import numpy as np
from pydantic import BaseModel

from cost.formulas import Collective, Compute, Work, ops_time
from cost.hardware import Hardware
from cost.layouts import REP, TOK, Attn, Layout, Mode, layer_ops, resident_bytes
from strategies.layout import NAMED_LAYOUTS, check_devices
from strategies.shapes import ModelShape

# The three named strategies, by the names the engine uses (every other candidate runs too, named by its label):
# spelled once, in the vocabulary the engine and the cost model share, so both run and price exactly the same ones.
STRATEGIES: dict[str, Layout] = NAMED_LAYOUTS
_NAMES = {c: n for n, c in STRATEGIES.items()}


class LayerCosts(BaseModel):
    """One candidate's per-layer costs at one token count, on the busiest device."""

    tokens: int
    flops: float
    activation_bytes: float  # blocking collectives: bytes sent per device
    weight_bytes: float  # prefetched weight all-gathers: bytes per device, independent of T
    latency_steps: int
    memory_bytes: float  # resident weights + buffers per device, whole model
    time_s: float  # predicted layer time on this hardware (informative; not a Pareto axis)


class FrontMember(BaseModel):
    label: str
    strategy: str | None  # engine name when executable
    equivalents: list[str]  # other candidates with identical costs
    costs: list[LayerCosts]


class SearchResult(BaseModel):
    model: str
    hardware: str
    devices: int
    tokens: list[int]
    candidates: int
    front: list[FrontMember]
    dominated_strategies: dict[str, str]  # executable strategy -> label of a front member that dominates it


def all_candidates() -> list[Layout]:
    """Every combination: residual state × QKV mode × attention placement × O, gate/up and down modes."""
    return [Layout(r, q, a, o, g, d)
            for r, q, a, o, g, d in itertools.product((REP, TOK), Mode, Attn, Mode, Mode, Mode)]


def layer_costs(c: Layout, shape: ModelShape, hw: Hardware, p: int, tokens: int) -> LayerCosts:
    """Cost one candidate (``shape`` already padded for p) at T = ``tokens`` (a single prompt)."""
    b = hw.bytes_per_element
    ops = layer_ops(c, shape, p, Work.prefill(tokens), b)
    colls = [op for op in ops if isinstance(op, Collective)]
    return LayerCosts(
        tokens=tokens,
        flops=sum(op.flops for op in ops if isinstance(op, Compute)),
        activation_bytes=sum(op.bytes_per_device(p) for op in colls if not op.prefetched),
        weight_bytes=sum(op.bytes_per_device(p) for op in colls if op.prefetched),
        latency_steps=sum(op.steps(p) for op in colls),
        memory_bytes=resident_bytes(c, shape, p, b),
        time_s=ops_time(ops, hw, p),
    )


def _vector(costs: list[LayerCosts]) -> list[float]:
    first = costs[0]
    return ([x.flops for x in costs] + [x.activation_bytes for x in costs]
            + [first.weight_bytes, first.latency_steps, first.memory_bytes])


def pareto_indices(vectors: np.ndarray) -> list[int]:
    """Indices of rows no other row dominates (≤ everywhere, < somewhere); identical rows all survive."""
    keep = []
    for i, v in enumerate(vectors):
        no_worse = np.all(vectors <= v, axis=1)
        better = np.any(vectors < v, axis=1)
        if not np.any(no_worse & better):
            keep.append(i)
    return keep


def search(shape: ModelShape, hw: Hardware, p: int, tokens: tuple[int, ...] = (128, 4096)) -> SearchResult:
    """The Pareto front of layer partitionings for (model, hardware, p), costed at each of ``tokens``."""
    layout = check_devices(shape, p)
    padded = layout.padded_shape(shape)
    cands = all_candidates()
    costs = [[layer_costs(c, padded, hw, p, t) for t in tokens] for c in cands]
    vectors = np.array([_vector(cs) for cs in costs])
    # Round to 1e-9 relative so float noise cannot split identical candidates.
    scale = np.maximum(np.abs(vectors).max(axis=0), 1.0)
    keys = np.round(vectors / scale, 9)
    front_idx = pareto_indices(keys)
    groups: dict[tuple, list[int]] = {}
    for i in front_idx:
        groups.setdefault(tuple(keys[i]), []).append(i)
    members = []
    for idxs in groups.values():
        named = [i for i in idxs if cands[i] in _NAMES]
        head = named[0] if named else min(idxs, key=lambda i: _complexity(cands[i]))
        members.append(FrontMember(label=cands[head].label, strategy=_NAMES.get(cands[head]),
                                   equivalents=[cands[i].label for i in idxs if i != head], costs=costs[head]))
    members.sort(key=lambda m: (m.strategy is None, m.costs[-1].time_s))
    dominated = {}
    on_front = {m.strategy for m in members}
    for name, c in STRATEGIES.items():
        if name not in on_front:
            v = keys[cands.index(c)]
            by = next((m for m in members if _dominates(keys[cands.index(_by_label(cands, m.label))], v)), None)
            if by is not None:  # else it costs the same as a member (listed among its equivalents)
                dominated[name] = by.label
    return SearchResult(model=shape.name, hardware=hw.name, devices=p, tokens=list(tokens), candidates=len(cands),
                        front=members, dominated_strategies=dominated)


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def _complexity(c: Layout) -> int:
    """Tie-break among equal-cost candidates: prefer the fewest distinct modes (the simplest to implement)."""
    return len({*c.modes().values()}) + (c.residual == TOK)


def _by_label(cands: list[Layout], label: str) -> Layout:
    return next(c for c in cands if c.label == label)
