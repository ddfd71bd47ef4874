"""The planner: which layout to prefill a batch with, and the full report behind that choice.

``plan_prefill`` is the one function the engine (per prefill batch) and the Serve ingress (per request and pool)
call; ``plan`` sweeps input lengths for ``dynpart plan``. Both cost layouts with the same model the Pareto search
uses, after the same device check the engine applies, and filter by memory. The layouts priced are the ``available``
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
from typing import TYPE_CHECKING

from pydantic import BaseModel

from strategies.cost.formulas import Work
from strategies.cost.hardware import Hardware
from strategies.cost.layouts import model_time, resident_bytes, workspace_bytes
from strategies.cost.search import STRATEGIES, search
from strategies.layout import STRATEGY_NAMES, ShardLayout, check_devices, parse_layout
from strategies.shapes import ModelShape

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_UTILIZATION = 0.9  # fraction of device memory the engine may use (weights, buffers, activations, KV)


class PlanChoice(BaseModel):
    """The strategy for one forward pass, and the predicted time of every strategy (None: cannot run it)."""

    strategy: str
    tokens: int
    predicted_s: dict[str, float | None]
    reasons: dict[str, str]  # why a strategy was not considered

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


class LengthRow(BaseModel):
    tokens: int
    predicted_s: dict[str, float | None]
    choice: str
    megatron_over_choice: float  # speed-up of the choice over megatron


class Crossover(BaseModel):
    tokens: int  # first length at which ``to`` is chosen
    before: str
    after: str


class DecodeRow(BaseModel):
    batch: int
    context: int
    predicted_s: dict[str, float | None]
    choice: str


class PlanReport(BaseModel):
    model: str
    hardware: str
    calibrated_from: str | None
    devices: int
    layout: ShardLayout
    lengths: list[LengthRow]
    crossovers: list[Crossover]
    memory: list[MemoryRow]
    memory_at_tokens: int
    decode: list[DecodeRow]


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
    names = _validate(available)
    padded = check_devices(shape, p).padded_shape(shape)
    times: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    for name in dict.fromkeys([*STRATEGY_NAMES, *names]):
        times[name] = model_time(parse_layout(name), padded, hw, p, work)
        row = memory_row(name, shape, hw, p, work, utilization)
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
    best = min(ok, key=lambda n: (ok[n], n != "megatron"))  # ties go to megatron: no replicas, no gathers
    return PlanChoice(strategy=best, tokens=work.tokens, predicted_s=times, reasons=reasons)


def _validate(available: Iterable[str] | None) -> list[str]:
    """Canonical names of the available layouts (a named layout's label becomes its name); ValueError on a bad one."""
    return list(STRATEGY_NAMES) if available is None else list(dict.fromkeys(parse_layout(a).name for a in available))


def _memo(kind: str, key: object, compute: Callable[[], list[str]]) -> list[str]:
    """``compute()``, remembered on disk by ``key`` and the cost model's own source (searching the front and the grid
    takes seconds; every engine replica of a pool would repeat it at start)."""
    root = Path(__file__).parent
    code = b"".join(f.read_bytes() for f in sorted([*root.glob("*.py"), root.parent / "layout.py"]))
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
        return [name for name in _validate(layouts) if name in keep]

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
    if not decoding or devices == 1:
        return chunks
    merged = plan_prefill(shape, hardware, devices, [*new, *[1] * len(decoding)], available, utilization,
                          cached=[*cached, *decoding]).predicted_s["megatron"]
    alone = decode_step_time(shape, hardware, devices, decoding)
    step = {s: (merged if s == "megatron" else t + alone) if t is not None else None
            for s, t in chunks.predicted_s.items()}
    ok = {s: t for s, t in step.items() if t is not None and s not in chunks.reasons}
    best = min(ok, key=lambda s: (ok[s], s != "megatron"))
    return PlanChoice(strategy=best, tokens=chunks.tokens, predicted_s=step, reasons=chunks.reasons)


def plan_decode(shape: ModelShape, hardware: Hardware, devices: int, contexts: Sequence[int],
                available: Iterable[str] | None = None, utilization: float = DEFAULT_UTILIZATION) -> PlanChoice:
    """The model's choice for one decode step of sequences with these cached lengths (it comes out megatron)."""
    return _choose(shape, hardware, devices, Work.decode(contexts), available, utilization)


def decode_step_time(shape: ModelShape, hardware: Hardware, devices: int, contexts: Sequence[int]) -> float:
    """Seconds for one megatron decode step (decode always runs megatron in the engine)."""
    padded = check_devices(shape, devices).padded_shape(shape)
    return model_time(STRATEGIES["megatron"], padded, hardware, devices, Work.decode(contexts))


def default_lengths(shape: ModelShape) -> list[int]:
    """Powers of two from 16 up to the model's context."""
    top = shape.max_position_embeddings
    return [2**k for k in range(4, int(math.log2(top)) + 1)] + ([top] if top & (top - 1) else [])


def plan(shape: ModelShape, hardware: Hardware, devices: int, lengths: Sequence[int] | None = None,
         available: Iterable[str] | None = None, utilization: float = DEFAULT_UTILIZATION) -> PlanReport:
    """Predicted prefill time of each strategy per length, the choices, crossovers, memory, decode step times."""
    layout = check_devices(shape, devices)
    lengths = sorted(set(lengths or default_lengths(shape)))

    def choose(t: int) -> PlanChoice:
        return plan_prefill(shape, hardware, devices, t, available, utilization)

    rows = []
    for t in lengths:
        ch = choose(t)
        mega = ch.predicted_s["megatron"]
        rows.append(LengthRow(tokens=t, predicted_s=ch.predicted_s, choice=ch.strategy,
                              megatron_over_choice=(mega / ch.time_s) if mega else 1.0))
    crossovers = _crossovers(choose, lengths[0], lengths[-1])
    top = Work.prefill(lengths[-1])
    memory = [memory_row(n, shape, hardware, devices, top, utilization) for n in _validate(available)]
    ctx = min(1024, shape.max_position_embeddings // 2)
    decode = []
    for bsz in (1, 16, 64):
        try:
            d = plan_decode(shape, hardware, devices, [ctx] * bsz, available, utilization)
        except ValueError:  # this batch's KV cache does not fit: larger batches will not either
            break
        decode.append(DecodeRow(batch=bsz, context=ctx, choice=d.strategy, predicted_s=d.predicted_s))
    return PlanReport(model=shape.name, hardware=hardware.name, calibrated_from=hardware.calibrated_from,
                      devices=devices, layout=layout, lengths=rows, crossovers=crossovers, memory=memory,
                      memory_at_tokens=lengths[-1], decode=decode)


def _crossovers(choose, lo: int, hi: int) -> list[Crossover]:
    """Lengths where the choice changes: scan 8 points per octave, then bisect each change to the exact token."""
    grid = sorted({lo, hi, *(round(lo * 2 ** (k / 8)) for k in range(int(8 * math.log2(hi / lo)) + 1))})
    grid = [t for t in grid if lo <= t <= hi]
    out = []
    prev_t, prev = grid[0], choose(grid[0]).strategy
    for t in grid[1:]:
        cur = choose(t).strategy
        if cur != prev:
            a, b = prev_t, t  # choice(a) == prev, choice(b) != prev
            while b - a > 1:
                mid = (a + b) // 2
                a, b = (mid, b) if choose(mid).strategy == prev else (a, mid)
            out.append(Crossover(tokens=b, before=prev, after=choose(b).strategy))
        prev_t, prev = t, cur
    return out


def plot_plan(report: PlanReport, path: str) -> Figure:
    """Prefill time against input length per layout (log-log), one line for every layout the report priced (the
    named strategies and every front member offered): the named strategies and every chosen layout in colour and in
    the legend, the other front members as thin grey lines; crossovers marked; writes a PNG and returns the figure
    (closed; each line's label is its layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r.tokens for r in report.lengths]
    priced = list(dict.fromkeys(name for r in report.lengths for name in r.predicted_s))
    shown = {*STRATEGIES, *(r.choice for r in report.lengths)}
    legend = []
    for name in priced:
        ys = [r.predicted_s[name] * 1e3 if r.predicted_s.get(name) is not None else float("nan")
              for r in report.lengths]
        if name in shown:
            legend += ax.plot(xs, ys, marker="o", ms=3, label=name)
        else:
            ax.plot(xs, ys, color="grey", lw=0.5, alpha=0.5, label=name)
    for c in report.crossovers:
        ax.axvline(c.tokens, color="grey", ls="--", lw=0.8)
        ax.annotate(f"{c.tokens}: →{_brief(c.after)}", (c.tokens, ax.get_ylim()[1]), rotation=90, va="top", ha="right",
                    fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="input tokens", ylabel="predicted prefill time (ms)",
           title=f"{report.model} on {report.devices}×{report.hardware}"
                 f"{' (calibrated)' if report.calibrated_from else ''}; grey: {len(priced) - len(legend)} other "
                 "front members")
    ax.legend(handles=legend, labels=[_brief(h.get_label()) for h in legend], fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def _brief(name: str) -> str:
    """A strategy name or a short label as it is, a long label ``_short``."""
    return name if len(name) < 40 else _short(name)


def _short(label: str) -> str:
    """A layout label in a few characters for legends: residual state, then the modes' first letters."""
    c = parse_layout(label)
    return f"{c.residual} " + " ".join(f"{m}:{mode.value[:3]}" for m, mode in (("attn", c.attn), *c.modes().items()))
