"""The planner at run time: which layout an engine step or a request's prefill runs with, and what it costs.

``plan_prefill`` / ``plan_step`` are what the engine (per step) and the Serve ingress (per request and pool) call;
``cost.report`` sweeps input lengths for ``dynpart plan`` with the same functions. Both cost layouts with the same
model the Pareto search uses, after the same device check the engine applies, and filter by memory. The layouts priced are the ``available``
ones (strategy names or layout labels): by default the three named strategies; an engine offers the whole executable
front (``executable_layouts``), of which it prices per step the members that win somewhere (``contenders``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from pydantic import BaseModel

from cost.formulas import Collective, Work
from cost.hardware import Hardware
from cost.layouts import layer_ops, model_time, resident_bytes, workspace_bytes
from cost.search import STRATEGIES, search
from strategies.layout import STRATEGY_NAMES, check_devices, parse_layout
from strategies.shapes import ModelShape

DEFAULT_UTILIZATION = 0.9  # fraction of device memory the engine may use (weights, buffers, activations, KV)


class PlanChoice(BaseModel):
    """The strategy for one forward pass, and the predicted time of every strategy (None: cannot run it)."""

    strategy: str
    tokens: int
    predicted_s: dict[str, float | None]
    reasons: dict[str, str]  # why a strategy was not considered
    tie: float = 0.0  # relative: layouts predicted within this of the fastest are ties (the calibration's noise)
    cheaper: dict[str, tuple[int, float]] = {}  # per layout (collectives per layer, GB per device): who wins a tie

    @property
    def time_s(self) -> float:
        return self.predicted_s[self.strategy]  # type: ignore[return-value]


class MemoryRow(BaseModel):
    strategy: str
    resident_gb: float
    workspace_gb: float
    kv_gb: float
    budget_gb: float
    feasible: bool


def memory_row(name: str, shape: ModelShape, hw: Hardware, p: int, work: Work,
               utilization: float = DEFAULT_UTILIZATION) -> MemoryRow:
    """Per-device memory a strategy needs for ``work``: weights (+ buffers/replicas), activations, and the K/V of
    the cached and new tokens (the sequences' whole cache must be resident while the chunk runs)."""
    padded, b, c = check_devices(shape, p).padded_shape(shape), hw.bytes_per_element, parse_layout(name)
    res = resident_bytes(c, padded, p, b)
    ws = workspace_bytes(c, padded, p, work, b)
    kv = work.kv_tokens * padded.kv_bytes_per_token(b) / p
    budget = hw.memory_gb * 1e9 * utilization
    return MemoryRow(strategy=name, resident_gb=res / 1e9, workspace_gb=ws / 1e9, kv_gb=kv / 1e9,
                     budget_gb=budget / 1e9, feasible=res + ws + kv <= budget)


def _choose(shape: ModelShape, hw: Hardware, p: int, work: Work, available: Iterable[str] | None,
            utilization: float) -> PlanChoice:
    names = available_names(available)
    padded = check_devices(shape, p).padded_shape(shape)
    times: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    rows: dict[str, MemoryRow] = {}
    for name in dict.fromkeys([*STRATEGY_NAMES, *names]):
        times[name] = model_time(parse_layout(name), padded, hw, p, work)
        row = rows[name] = memory_row(name, shape, hw, p, work, utilization)
        if not row.feasible:  # cannot run at all: no prediction
            times[name] = None
            reasons[name] = (f"needs {row.resident_gb + row.workspace_gb + row.kv_gb:.1f} GB per device, "
                             f"budget {row.budget_gb:.1f} GB")
        elif name not in names:
            reasons[name] = "not available in the engine"
    ok = {n: t for n, t in times.items() if n not in reasons}
    if not ok:
        after = f" after {work.cached_tokens} cached" if work.cached_tokens else ""
        raise ValueError(f"no strategy can run {work.tokens} tokens{after} of {shape.name} on {p}×{hw.name}: "
                         + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    tie = hw.prediction_spread
    cheaper = {n: (collectives_per_layer(n, padded, p, work, hw.bytes_per_element),
                   rows[n].resident_gb + rows[n].workspace_gb) for n in ok} if tie > 0 else {}
    return PlanChoice(strategy=best_of(ok, tie, cheaper), tokens=work.tokens, predicted_s=times, reasons=reasons,
                      tie=tie, cheaper=cheaper)


def collectives_per_layer(name: str, padded: ModelShape, p: int, work: Work, b: int) -> int:
    return sum(isinstance(o, Collective) for o in layer_ops(parse_layout(name), padded, p, work, b))


def best_of(times: dict[str, float], tie: float = 0.0, cheaper: dict[str, tuple[int, float]] | None = None) -> str:
    """The fastest of ``times`` (layout -> predicted seconds). Layouts predicted within ``tie`` (relative: what the
    calibration measured as its own noise) of the fastest are ties, since the model cannot tell them apart: megatron
    wins them (no replicas, no gathers), then the one with fewer collectives, then less memory (``cheaper``)."""
    fastest = min(times, key=lambda n: (times[n], n != "megatron"))
    if tie <= 0 or not cheaper:
        return fastest
    close = [n for n in times if times[n] <= times[fastest] * (1 + tie)]
    return min(close, key=lambda n: (n != "megatron", *cheaper.get(n, (0, 0.0)), times[n]))


def available_names(available: Iterable[str] | None) -> list[str]:
    """Canonical names of the available layouts (a named layout's label becomes its name); ValueError on a bad one."""
    return list(STRATEGY_NAMES) if available is None else list(dict.fromkeys(parse_layout(a).name for a in available))


def _memo(kind: str, key: object, compute: Callable[[], list[str]]) -> list[str]:
    """``compute()``, remembered on disk by ``key`` and the cost model's own source (searching the front and the grid
    takes seconds; every engine replica of a pool would repeat it at start)."""
    root = Path(__file__).parent
    code = b"".join(f.read_bytes() for f in sorted([*root.glob("*.py"), root.parent / "strategies" / "layout.py"]))
    digest = hashlib.sha256(code + json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("DYNPART_CACHE") or Path.home() / ".cache" / "dynpart")  # as strategies.loader
    path = cache / "plans" / f"{kind}-{digest}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)  # atomic: replicas starting together never read half a file
        return value


def executable_layouts(shape: ModelShape, hardware: Hardware, devices: int) -> list[str]:
    """The named strategies and every member of the Pareto front for this model and device count (all run)."""
    if devices == 1:  # one device: every layout is the same computation
        return list(STRATEGY_NAMES)

    def compute() -> list[str]:
        front = search(shape, hardware, devices).front
        return list(dict.fromkeys([*STRATEGY_NAMES, *(m.strategy or m.label for m in front)]))

    return _memo("front", [shape.model_dump(), hardware.model_dump(), devices], compute)


def contenders(shape: ModelShape, hardware: Hardware, devices: int, layouts: Sequence[str], max_tokens: int,
               utilization: float = DEFAULT_UTILIZATION) -> list[str]:
    """Those of ``layouts`` the planner picks somewhere on a grid of chunk lengths (1 … ``max_tokens``, four points
    per octave) after cached prefixes of 0 … 4× the chunk, alone and with decode tokens riding along: the rest
    never win there, so pricing them per step would only cost time. Megatron (decode) is always kept."""
    def compute() -> list[str]:
        grid = sorted({max(1, round(2 ** (k / 4))) for k in range(int(4 * math.log2(max(2, max_tokens))) + 1)})
        keep = {"megatron"}
        for n in grid:
            for cached in (0, n, 4 * n):
                for decoding in ([], [cached + n] * 8):
                    try:
                        keep.add(plan_step(shape, hardware, devices, [n], [cached], decoding, layouts, utilization)
                                 .strategy)
                    except ValueError:  # nothing fits this much
                        pass
        return [name for name in available_names(layouts) if name in keep]

    return _memo("contenders", [shape.model_dump(), hardware.model_dump(), devices, list(layouts), max_tokens,
                                utilization], compute)


def plan_prefill(shape: ModelShape, hardware: Hardware, devices: int, tokens: int | Sequence[int],
                 available: Iterable[str] | None = None, utilization: float = DEFAULT_UTILIZATION,
                 cached: int | Sequence[int] = 0) -> PlanChoice:
    """The fastest strategy that is available and fits memory, for one prompt (int) or a batch of prompt lengths.

    ``tokens`` are the new tokens of each sequence (a whole prompt, or a chunk of one) and ``cached`` how many of
    its earlier tokens are already in the KV cache (int: the same for every sequence; else aligned with ``tokens``):
    a cached prefix costs attention reads everywhere and a per-layer K/V gather for the token-sharded strategies.
    ``available`` restricts the choice to what the engine can run now (e.g. without materialised replicas);
    unavailable strategies are still predicted, memory-infeasible ones are reported with a reason and None.
    """
    return _choose(shape, hardware, devices, Work.chunks(tokens, cached), available, utilization)


def plan_step(shape: ModelShape, hardware: Hardware, devices: int, new: Sequence[int], cached: Sequence[int],
              decoding: Sequence[int], available: Iterable[str] | None = None,
              utilization: float = DEFAULT_UTILIZATION) -> PlanChoice:
    """The strategy for an engine step's prefill chunks (``new`` tokens after ``cached`` ones each) when decode tokens
    of sequences with ``decoding`` cached tokens ride in the same step. Decode always runs megatron: with a megatron
    chunk it is one pass over every token, with another strategy a second pass of its own, so each strategy is priced
    for the whole step as the engine runs it (``predicted_s`` holds those step times)."""
    chunks = plan_prefill(shape, hardware, devices, list(new), available, utilization, cached=list(cached))
    if not decoding:
        return chunks
    # the chunks and the decode tokens in one pass (how a megatron step runs them)
    merged = plan_prefill(shape, hardware, devices, [*new, *[1] * len(decoding)], available, utilization,
                          cached=[*cached, *decoding])
    if devices == 1:  # one layout, one pass over every token: the decode tokens ride in it whatever it is called
        return merged.model_copy(update={"tokens": chunks.tokens})
    alone = decode_step_time(shape, hardware, devices, decoding)
    step = {s: (merged.predicted_s["megatron"] if s == "megatron" else t + alone) if t is not None else None
            for s, t in chunks.predicted_s.items()}
    ok = {s: t for s, t in step.items() if t is not None and s not in chunks.reasons}
    return PlanChoice(strategy=best_of(ok, chunks.tie, chunks.cheaper), tokens=chunks.tokens, predicted_s=step,
                      reasons=chunks.reasons, tie=chunks.tie, cheaper=chunks.cheaper)


def plan_decode(shape: ModelShape, hardware: Hardware, devices: int, contexts: Sequence[int],
                available: Iterable[str] | None = None, utilization: float = DEFAULT_UTILIZATION) -> PlanChoice:
    """The model's choice for one decode step of sequences with these cached lengths (it comes out megatron)."""
    return _choose(shape, hardware, devices, Work.decode(contexts), available, utilization)


def decode_step_time(shape: ModelShape, hardware: Hardware, devices: int, contexts: Sequence[int]) -> float:
    """Seconds for one megatron decode step (decode always runs megatron in the engine)."""
    padded = check_devices(shape, devices).padded_shape(shape)
    return model_time(STRATEGIES["megatron"], padded, hardware, devices, Work.decode(contexts))
