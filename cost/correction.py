"""Online correction of the cost model by what the engine measures: predictions that stay right on this machine.

Scored on lengths it was not fitted on, a fresh calibration is off by a bias (every prediction low by 6-36%) that a
roofline cannot see: Python dispatch, the driver's hop into the workers, caches, thread placement. Every engine step is
timed anyway, so each one is a labelled sample: ``Correction.observe`` keeps log(measured / predicted) per
``StepKey`` (layout, kind of step, log2 bucket of its new tokens, log2 bucket of its cached prefix), and the fitted
``CorrectionTable`` multiplies later predictions by the learned factor.

The fit has few parameters and is robust on purpose: per key the median of the last ``WINDOW`` log ratios (one
stalled step does not move it; a real change of speed takes over within half a window), shrunk toward the coarser
levels (same layout and kind, same kind, everything) with ``PRIOR`` steps of weight, so a bucket never seen takes its
layout's factor, then its kind's, then the global one, and a bucket's own figure takes over as its evidence grows.
Pure arithmetic and pydantic: the engine feeds it, the planner, the router's pricing and admission read its table, and
it is persisted beside the calibration profile (a restart starts warm; a new calibration starts afresh).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from cost.hardware import Hardware, profile_dir
from cost.planner import PlanChoice, best_of

StepKind = Literal["prefill", "decode", "mixed"]  # prefill chunks only, decode tokens only, or both in one step
WINDOW = 16  # log ratios kept per level key: the fit is their median
PRIOR = 4.0  # steps of evidence at which a key's own median weighs as much as its parent's figure
MAX_LOG = math.log(1e4)  # ratios clamped to 1e-4 … 1e4: bounded arithmetic (the median already ignores a stall)
SEP = "|"  # joins a level key's parts (layout labels hold spaces and '=', never '|')


def bucket(n: float) -> int:
    """The log2 bucket of a count: 0 for none, k for [2^(k-1), 2^k)."""
    return int(max(0, n)).bit_length()


class StepKey(NamedTuple):
    """Which correction a step's prediction takes: its layout, kind, and the log2 buckets of its new tokens (chunks
    plus decode tokens) and of its cached prefix (the chunks' cached tokens; a decode step's mean context)."""

    layout: str
    kind: StepKind
    tokens: int
    cached: int

    @classmethod
    def of(cls, layout: str, kind: StepKind, tokens: float, cached: float) -> StepKey:
        return cls(layout, kind, bucket(tokens), bucket(cached))

    def levels(self) -> list[str]:
        """Level keys from the coarsest (every step) to this key itself."""
        parts = [self.kind, self.layout, f"{self.tokens}{SEP}{self.cached}"]
        return ["", *(SEP.join(parts[:i]) for i in range(1, len(parts) + 1))]


class CorrectionTable(BaseModel):
    """The fitted correction: per level key, (median log ratio, steps seen). What the engine's planner applies, what a
    replica's load report carries to the router's pricing (plain data), and what ``merge`` pools across replicas."""

    model_config = ConfigDict(frozen=True)
    entries: dict[str, tuple[float, int]] = {}
    # (kind, layout, cached bucket) -> [(token bucket, level key)] sorted: the learned token buckets of a layout
    _buckets: dict[tuple[str, str, str], list[tuple[int, str]]] | None = PrivateAttr(default=None)
    _memo: dict[StepKey, float] = PrivateAttr(default_factory=dict)  # the table is frozen: each key's figure once

    def log_factor(self, key: StepKey) -> float:
        """log of the factor for ``key``: each level's median shrunk toward its parent's figure by ``PRIOR``. A token
        bucket between two learned ones of the same layout, kind and cached bucket is shrunk toward their
        interpolation (linear in log2 tokens) instead of the layout's figure: the cost model's bias changes smoothly
        with the step's size, and a layout's figure mixes every size it ran (held out at 200 and 1,500 tokens between
        steps learned at 60, 300, 1,000 and 2,200: 11% and 22% off with the layout's figure, 2% and 11% with the
        interpolation; BENCHMARKS.md)."""
        if (memo := self._memo.get(key)) is not None:
            return memo
        self._memo[key] = value = self._fitted(key)
        return value

    def _fitted(self, key: StepKey) -> float:
        *coarse, own = key.levels()
        if coarse[-1] not in self.entries and (borrowed := self._borrowed(key)) is not None:
            return borrowed
        value = 0.0
        for level in coarse:
            value = self._shrunk(level, value)
        between = self._between(key, value)
        return self._shrunk(own, value if between is None else between)

    def _shrunk(self, level: str, parent: float) -> float:
        """``level``'s median shrunk toward ``parent`` with ``PRIOR`` steps of weight (``parent`` if never seen)."""
        median, n = self.entries.get(level, (0.0, 0))
        return (n * median + PRIOR * parent) / (n + PRIOR)

    def _borrowed(self, key: StepKey) -> float | None:
        """A layout never run (the engine runs the layouts it chooses) borrows the size profile of those that ran: the
        mean of their factors at ``key``'s size, weighted by their steps; None when no layout of that kind ran. The
        bias is mostly in what layouts share (the GEMMs' efficiency at that size), so another layout's figure at the
        same size is closer than the kind's, which mixes every size (BENCHMARKS.md)."""
        ran = [(level.split(SEP)[1], n) for level, (_, n) in self.entries.items()
               if level.count(SEP) == 1 and level.startswith(key.kind + SEP) and n > 0]
        if not ran:
            return None
        total = sum(n for _, n in ran)
        return sum(n * self.log_factor(key._replace(layout=layout)) for layout, n in ran) / total

    def _between(self, key: StepKey, parent: float) -> float | None:
        """The interpolation of the nearest learned token buckets below and above ``key``'s (each shrunk toward
        ``parent``), None unless both exist."""
        if self._buckets is None:
            index: dict[tuple[str, str, str], list[tuple[int, str]]] = {}
            for level in self.entries:
                parts = level.split(SEP)
                if len(parts) == 4:
                    index.setdefault((parts[0], parts[1], parts[3]), []).append((int(parts[2]), level))
            self._buckets = {k: sorted(v) for k, v in index.items()}
        learned = self._buckets.get((key.kind, key.layout, str(key.cached)), [])
        below = [b for b in learned if b[0] < key.tokens]
        above = [b for b in learned if b[0] > key.tokens]
        if not below or not above:
            return None
        (lo, lo_key), (hi, hi_key) = below[-1], above[0]
        low, high = self._shrunk(lo_key, parent), self._shrunk(hi_key, parent)
        return low + (key.tokens - lo) / (hi - lo) * (high - low)

    def factor(self, key: StepKey) -> float:
        return math.exp(self.log_factor(key))

    def correct(self, key: StepKey, predicted_s: float) -> float:
        return predicted_s * self.factor(key)

    def steps(self) -> int:
        """Steps behind the table (its global level's count)."""
        return self.entries.get("", (0.0, 0))[1]

    @classmethod
    def merge(cls, tables: Iterable[CorrectionTable]) -> CorrectionTable:
        """Several replicas' tables as one: per key the count-weighted mean of their medians, counts summed."""
        acc: dict[str, tuple[float, int]] = {}
        for t in tables:
            for k, (m, n) in t.entries.items():
                s, c = acc.get(k, (0.0, 0))
                acc[k] = (s + m * n, c + n)
        return cls(entries={k: (s / c if c else 0.0, c) for k, (s, c) in acc.items()})


def corrected_choice(choice: PlanChoice, table: CorrectionTable, kind: StepKind, tokens: float,
                     cached: float) -> PlanChoice:
    """``choice`` with every layout's predicted time multiplied by its learned factor and the best chosen again by
    the planner's own rule (``best_of``, ties within the calibration's noise included; unavailable layouts stay
    out)."""
    if not table.entries:
        return choice
    times = {s: None if t is None else table.correct(StepKey.of(s, kind, tokens, cached), t)
             for s, t in choice.predicted_s.items()}
    ok = {s: t for s, t in times.items() if t is not None and s not in choice.reasons}
    return choice.model_copy(update={"strategy": best_of(ok, choice.tie, choice.cheaper), "predicted_s": times})


class CorrectionState(BaseModel):
    """What is persisted: the windows and counts per level key, and the stamp of the cost model they correct."""

    version: Literal[1] = 1
    stamp: str
    windows: dict[str, list[float]] = {}
    counts: dict[str, int] = {}


class Correction:
    """The learner: ``observe`` each timed step, ``table`` for the fitted factors. Not thread-safe by itself; the engine
    feeds it from its one thread."""

    def __init__(self, stamp: str = "", window: int = WINDOW):
        self.stamp, self.window = stamp, window
        self._windows: dict[str, deque[float]] = {}
        self._counts: dict[str, int] = {}
        self._table: CorrectionTable | None = CorrectionTable()

    def observe(self, key: StepKey, predicted_s: float, measured_s: float) -> None:
        """One step: the (uncorrected) prediction made for it and what it took. Non-positive figures are ignored."""
        if not (predicted_s > 0 and measured_s > 0 and math.isfinite(predicted_s) and math.isfinite(measured_s)):
            return
        r = max(-MAX_LOG, min(MAX_LOG, math.log(measured_s / predicted_s)))
        for level in key.levels():
            self._windows.setdefault(level, deque(maxlen=self.window)).append(r)
            self._counts[level] = self._counts.get(level, 0) + 1
        self._table = None

    def table(self) -> CorrectionTable:
        if self._table is None:
            self._table = CorrectionTable(entries={k: (statistics.median(w), self._counts[k])
                                                   for k, w in self._windows.items()})
        return self._table

    def factor(self, key: StepKey) -> float:
        return self.table().factor(key)

    def correct(self, key: StepKey, predicted_s: float) -> float:
        return self.table().correct(key, predicted_s)

    def state(self) -> CorrectionState:
        return CorrectionState(stamp=self.stamp, windows={k: list(w) for k, w in self._windows.items()},
                               counts=dict(self._counts))

    @classmethod
    def from_state(cls, state: CorrectionState, window: int = WINDOW) -> Correction:
        c = cls(state.stamp, window)
        c._windows = {k: deque(w, maxlen=window) for k, w in state.windows.items()}
        c._counts = {k: state.counts.get(k, len(w)) for k, w in state.windows.items()}
        c._table = None
        return c

    def save(self, path: Path) -> None:
        """Write the state atomically (replicas of a pool share the file: the last one's wins)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(self)}.tmp")
        tmp.write_text(self.state().model_dump_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, stamp: str) -> Correction:
        """The state saved at ``path`` if it corrects the same cost model (``stamp``), else a fresh one."""
        try:
            state = CorrectionState.model_validate_json(path.read_text())
        except (OSError, ValidationError, ValueError):
            return cls(stamp)
        return cls.from_state(state) if state.stamp == stamp else cls(stamp)


def correction_stamp(hardware: Hardware, model: str, devices: int) -> str:
    """What the learned factors are relative to: the priced hardware (catalog entry, profile, core share), the model
    and p. Any change (a new calibration) changes the raw predictions, so the factors start afresh."""
    key = f"{hardware.model_dump_json()}{SEP}{model}{SEP}{devices}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def correction_path(hardware: Hardware, model: str, devices: int) -> Path:
    """Beside the calibration profiles: ``<profile dir>/corrections/<hardware>-<model>-p<devices>.json``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)
    return profile_dir() / "corrections" / f"{hardware.name}-{safe}-p{devices}.json"
