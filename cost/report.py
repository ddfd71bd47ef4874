"""The planner's report: every layout's predicted prefill time across input lengths, where the choice changes, the
memory each needs and the decode step, for ``dynpart plan``, the simulator's pools and the plan plot; built only from
the run-time planner's own functions (``cost.planner``), so the report explains exactly the choices the engine makes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel

from cost.formulas import Work
from cost.hardware import Hardware
from cost.planner import (DEFAULT_UTILIZATION, MemoryRow, PlanChoice, available_names, memory_row, plan_decode,
                          plan_prefill)
from cost.search import STRATEGIES
from strategies.layout import DeviceSplit, check_devices, parse_layout
from strategies.shapes import ModelShape

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    layout: DeviceSplit
    lengths: list[LengthRow]
    crossovers: list[Crossover]
    memory: list[MemoryRow]
    memory_at_tokens: int
    decode: list[DecodeRow]


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
    memory = [memory_row(n, shape, hardware, devices, top, utilization) for n in available_names(available)]
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
