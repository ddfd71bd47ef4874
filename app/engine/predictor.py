"""The planner as one engine replica uses it: each step's layout and predicted time, corrected by what it measured.

The engine times every step it runs; this object turns those timings into better predictions for the next ones. For a
step it asks the planner (``plan_step``, ``plan_prefill``, ``decode_step_time``) for every layout's time, multiplies
each by the factor learned for that kind of step (``cost.correction``), and picks the fastest of the corrected times;
after the step it feeds the planner's own (uncorrected) prediction and the measured time back. The learned table goes
out with the replica's load report (the router prices pools with it) and to disk beside the calibration profile every
``SAVE_EVERY`` steps (a restarted replica starts warm). Kept out of ``llm_engine.py`` so the engine only asks
"which layout, how long" and reports "it took this".
"""

from __future__ import annotations

import functools
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cost import Hardware, PlanChoice, decode_step_time, plan_prefill, plan_step
from cost.correction import Correction, CorrectionTable, StepKey, StepKind, corrected_choice
from strategies.shapes import ModelShape

DECODE_LAYOUT = "megatron"  # decode tokens always run Megatron (``scheduler.DECODE_STRATEGY``)
SAVE_EVERY = 64  # steps between writes of the learned factors
DECODE_CONTEXT_STEP = 16  # a decode step is priced at its mean context rounded to this many tokens


@dataclass(frozen=True)
class StepPrediction:
    """A step's layout and predicted seconds: the planner's (``raw_s``, what the correction learns from) and the
    corrected one (what decisions use). ``key`` None: the planner had no figure for it (nothing to learn)."""

    strategy: str
    raw_s: float = 0.0
    corrected_s: float = 0.0
    key: StepKey | None = None


def step_shape(new: Sequence[int], cached: Sequence[int], decoding: Sequence[int]) -> tuple[StepKind, int, float]:
    """(kind, new tokens, cached prefix) of a step as its ``StepKey`` buckets them: a decode step's "cached" is the
    mean context of its sequences, a step with chunks the chunks' cached tokens."""
    if not new:
        return "decode", len(decoding), statistics.fmean(decoding) if decoding else 0.0
    return ("mixed" if decoding else "prefill"), sum(new) + len(decoding), float(sum(cached))


class StepPredictor:
    """Predictions for one engine: ``shape`` on ``devices`` of ``hardware``, choosing among ``picks`` (the
    contenders), corrected by ``correction`` (saved to ``path`` when given)."""

    def __init__(self, shape: ModelShape, hardware: Hardware, devices: int, picks: Sequence[str],
                 correction: Correction | None = None, path: Path | None = None, learns: bool = True):
        self.shape, self.hardware, self.devices, self.picks = shape, hardware, devices, list(picks)
        self.learns = learns  # False: the planner's predictions as they are (``online_correction: false``)
        self.correction = correction or Correction()
        self.path = path
        self._lock = threading.Lock()  # the errors are drained by the replica's report task, another thread
        self._errors: dict[str, list[float]] = {}
        self._since_save = 0
        self.learning = True  # off while a replica warms up: first-use steps say nothing about later ones

    def plan(self, requested: str | None, new: list[int], cached: list[int], decoding: list[int]) -> StepPrediction:
        """The step's layout (``requested``: None for decode only, ``auto`` for the planner's corrected pick, else
        that layout) and its predicted time."""
        kind, tokens, ctx = step_shape(new, cached, decoding)
        table = self.correction.table()
        if requested is None:
            raw = self._decode_s(len(decoding), round(ctx / DECODE_CONTEXT_STEP) * DECODE_CONTEXT_STEP)
            key = StepKey.of(DECODE_LAYOUT, kind, tokens, ctx)
            return StepPrediction(DECODE_LAYOUT, raw, table.correct(key, raw), key)
        pricing = self.picks if requested == "auto" or requested in self.picks else [requested]
        choice = self._plan_step(tuple(pricing), tuple(new), tuple(cached), tuple(decoding))
        if choice is None:  # nothing it may run fits the memory model: the engine runs what it was asked regardless
            return StepPrediction(DECODE_LAYOUT if requested == "auto" else requested)
        strategy = corrected_choice(choice, table, kind, tokens, ctx).strategy if requested == "auto" else requested
        raw = choice.predicted_s.get(strategy)
        if raw is None:
            return StepPrediction(strategy)
        key = StepKey.of(strategy, kind, tokens, ctx)
        return StepPrediction(strategy, raw, table.correct(key, raw), key)

    @functools.lru_cache(maxsize=4096)
    def _plan_step(self, pricing: tuple[str, ...], new: tuple[int, ...], cached: tuple[int, ...],
                   decoding: tuple[int, ...]) -> PlanChoice | None:
        """The planner's step, remembered by its shape: the step budget prices the same few candidate chunks (over
        bucketed decode contexts) step after step, and the correction is applied on top each time, fresh."""
        try:
            return plan_step(self.shape, self.hardware, self.devices, new, cached, decoding, available=pricing)
        except ValueError:
            return None

    @functools.lru_cache(maxsize=4096)
    def _decode_s(self, sequences: int, context: int) -> float:
        """The planner's decode step, remembered by batch size and mean context (a decode step pays no planner)."""
        return decode_step_time(self.shape, self.hardware, self.devices, [context] * sequences)

    def prefill_s(self, tokens: int) -> float:
        """Corrected seconds to prefill ``tokens`` waiting prompt tokens in one step (the engine's load estimate)."""
        choice = plan_prefill(self.shape, self.hardware, self.devices, tokens, available=self.picks)
        return corrected_choice(choice, self.correction.table(), "prefill", tokens, 0).time_s

    def observe(self, prediction: StepPrediction, measured_s: float) -> None:
        """A step ran ``prediction`` and took ``measured_s``: learn from it; save every ``SAVE_EVERY`` steps."""
        if prediction.key is None or not (self.learns and self.learning):
            return
        self.correction.observe(prediction.key, prediction.raw_s, measured_s)
        if prediction.corrected_s > 0:
            with self._lock:
                self._errors.setdefault(prediction.strategy, []).append(measured_s / prediction.corrected_s - 1)
        self._since_save += 1
        if self.path is not None and self._since_save >= SAVE_EVERY:
            self.save()

    def save(self) -> None:
        if self.path is not None:
            self._since_save = 0
            try:
                self.correction.save(self.path)
            except OSError:  # a read-only cache costs the warm start, never a step
                pass

    def table(self) -> CorrectionTable:
        return self.correction.table()

    def drain_errors(self) -> dict[str, float]:
        """Per layout, the mean absolute relative error (|measured / predicted - 1|) of the corrected predictions of
        the steps since the last call (for ``dynpart_prediction_error``)."""
        with self._lock:
            errors, self._errors = self._errors, {}
        return {layout: statistics.fmean(abs(e) for e in es) for layout, es in errors.items()}


def guessed_step_s(shape: ModelShape, hardware, devices: int, max_model_len: int, max_num_seqs: int) -> float:
    """A decode step's seconds before any is measured: the planner's, for up to 8 sequences at half the context (the
    engine's starting figure, and an ingress's until the first load report)."""
    return decode_step_time(shape, hardware, devices, [max_model_len // 2] * min(max_num_seqs, 8))
