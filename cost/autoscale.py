"""The SLO autoscaling policy: how many replicas a pool needs so its TTFT percentile and TPOT stay under their
objectives, predicted from the cost model rather than read off a request count.

Why a model and not a counter: Serve's default policy keeps ``target_ongoing_requests`` per replica, a number that
says nothing about latency (a replica with 8 chat turns decoding is idle next to one with 8 long prompts queued), and
it only reacts after the queue has grown. Here a replica's speed is the planner's: its prefill time by prompt length
(for the layouts that replica runs) and its decode step time by batch and context, tabulated once per pool
(``ReplicaProfile``). From a window of recent requests (rate, burstiness, prompt and output lengths) ``predict``
estimates, for c replicas:

- prefill load a = λ·E[S] (S: a prompt's predicted prefill time); the prefills queue M/G/c-style across replicas (the
  router sends each to the least-loaded one), with the Allen–Cunneen approximation: P(wait) = Erlang C(c, a), and the
  wait, when there is one, exponential with mean E[S]·(ca² + cs²)/2 / (c − a). The TTFT percentile q is that wait's
  q-quantile plus the q-quantile prefill time plus one decode step (a prefill waits for the step in flight);
- decode gets what prefills leave: TPOT = step(N, context)/(1 − a/c) with N = λ/c·E[output]·TPOT running sequences
  per replica (Little's law), solved by fixed point; N's percentile (N + z·√(max(1, ca²)·N): counts of bursty
  arrivals vary ca² times more than Poisson ones) must fit the replica's KV cache (prompt + output reserved per
  sequence) and ``max_seqs``.

``decide`` scales up at once to the fewest replicas whose predicted latency is within ``up_headroom`` of the SLO (of the
slack the SLO leaves above what no replica count removes: the percentile prompt's prefill, one decode step), for the
rate forecast one cold start ahead (the window's linear trend, never downward, at most 1.5× the window's rate) plus the requests already queued; it scales
down only when one replica fewer still predicts within the stricter ``down_headroom`` at the current rate,
and only after that has held for ``downscale_delay_s`` (hysteresis band plus cooldown); never outside
[min_replicas, max_replicas]. Every decision carries its reason. Pure: no clock, no Serve, no I/O; the simulator and
the Serve policy (``app/serve/slo_policy.py``) call the same ``decide``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from statistics import NormalDist

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

INFEASIBLE = math.inf


class SLOTarget(BaseModel):
    """A pool's latency objectives: ``percentile`` of TTFT under ``ttft_s``, every request's TPOT under ``tpot_s``."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # a misspelt objective is an error, not the default
    ttft_s: float = Field(1.0, gt=0)
    tpot_s: float = Field(0.1, gt=0)
    percentile: float = Field(0.9, gt=0, lt=1)


class AutoscaleSettings(BaseModel):
    """Bounds and the knobs of the hysteresis; the defaults suit GPU pools with a cold start of tens of seconds."""

    model_config = ConfigDict(frozen=True)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(64, ge=1)
    cold_start_s: float = Field(60.0, ge=0)  # measured: replica start to first request served
    window_s: float = Field(30.0, gt=0)  # the requests the rate and the mix are read from
    up_headroom: float = Field(0.8, gt=0, le=1)  # size for predicted latency ≤ this × the SLO
    down_headroom: float = Field(0.6, gt=0, le=1)  # shrink only while one fewer predicts ≤ this × the SLO
    downscale_delay_s: float = Field(60.0, ge=0)  # ... continuously for this long
    backlog_drain_s: float = Field(30.0, gt=0)  # queued requests count as this much extra rate: queued / drain_s

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscaleSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.down_headroom > self.up_headroom:
            raise ValueError("down_headroom must not exceed up_headroom (the band is the hysteresis)")
        return self


def _bracket(xs: Sequence[float], x: float) -> tuple[int, float]:
    """(i, w): x lies w of the way from xs[i - 1] to xs[i] (w outside [0, 1] past the ends: linear extrapolation)."""
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    return i, (x - xs[i - 1]) / (xs[i] - xs[i - 1])


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) on sorted ``xs``; linear extrapolation past the ends (times grow with work)."""
    if len(xs) == 1:
        return ys[0]
    i, w = _bracket(xs, x)
    return max(0.0, ys[i - 1] + (ys[i] - ys[i - 1]) * w)


class ReplicaProfile(BaseModel):
    """One replica of a pool as the cost model predicts it: step times tabulated from the planner, and its capacity.

    ``prefill_s[k][j]``: a prefill pass of ``prefill_batches[k]`` prompts sharing ``prefill_tokens[j]`` tokens equally,
    with the layout the planner picks among the replica's; ``decode_s[b][j]``: a megatron decode step of
    ``decode_batches[b]`` sequences with ``decode_contexts[j]`` cached tokens each. Built by
    ``cost.autoscale_sim.replica_profile``."""

    model_config = ConfigDict(frozen=True)
    name: str
    devices: int
    kv_capacity_tokens: int
    max_seqs: int
    max_batched_tokens: int
    prefill_batches: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    prefill_s: tuple[tuple[float, ...], ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_s: tuple[tuple[float, ...], ...]
    _single: dict[int, float] = PrivateAttr(default_factory=dict)

    def prefill_time(self, tokens: int, batch: int = 1) -> float:
        """Seconds for one pass prefilling ``batch`` prompts of ``tokens`` tokens in all (linear in tokens between
        grid points, in log batch between batch sizes)."""
        ks = self.prefill_batches
        if batch <= ks[0] or len(ks) == 1:
            return _interp(self.prefill_tokens, self.prefill_s[0], tokens)
        i = min(max(bisect.bisect_left(ks, batch), 1), len(ks) - 1)
        lo, hi = (_interp(self.prefill_tokens, self.prefill_s[j], tokens) for j in (i - 1, i))
        w = min(1.0, math.log2(batch / ks[i - 1]) / math.log2(ks[i] / ks[i - 1]))
        return lo + w * (hi - lo)

    def batch_prefill_time(self, lengths: Sequence[int]) -> float:
        """A pass over prompts of these lengths, priced as that many prompts of their mean length (a batch's
        attention is slightly underestimated when its lengths differ a lot)."""
        return self.prefill_time(sum(lengths), len(lengths))

    def decode_time(self, batch: float, context: float) -> float:
        """Seconds for one decode step of ``batch`` sequences of ``context`` cached tokens (bilinear)."""
        bs, cs, t = self.decode_batches, self.decode_contexts, self.decode_s
        if len(bs) == 1 or len(cs) == 1:
            return _interp(bs, [_interp(cs, row, context) for row in t], max(1.0, batch))
        i, u = _bracket(bs, max(1.0, batch))
        j, v = _bracket(cs, context)
        lo = t[i - 1][j - 1] + (t[i - 1][j] - t[i - 1][j - 1]) * v
        hi = t[i][j - 1] + (t[i][j] - t[i][j - 1]) * v
        return max(0.0, lo + (hi - lo) * u)

    def calibrated(self, prefill_speed: float = 1.0, decode_speed: float = 1.0,
                   kv_capacity_tokens: int | None = None) -> "ReplicaProfile":
        """This profile with prefill passes ``prefill_speed`` and decode steps ``decode_speed`` times as long (what
        the replicas measure against what the planner predicts: an uncalibrated CPU can be off by a constant, and not
        the same one for prefill and decode) and the KV room the replicas report. A new object, so the prefill memo
        starts empty (``model_copy`` would share it)."""
        fields = self.model_dump()
        fields["prefill_s"] = tuple(tuple(t * prefill_speed for t in row) for row in self.prefill_s)
        fields["decode_s"] = tuple(tuple(t * decode_speed for t in row) for row in self.decode_s)
        if kv_capacity_tokens:
            fields["kv_capacity_tokens"] = kv_capacity_tokens
        return ReplicaProfile(**fields)

    def single_prefill_time(self, tokens: int) -> float:
        """``prefill_time(tokens)`` memoised: the policy prices every request of its window on each call."""
        hit = self._single.get(tokens)
        if hit is None:
            hit = self._single[tokens] = self.prefill_time(tokens)
        return hit


class Window(BaseModel):
    """What a pool saw lately: the requests that arrived in the last ``span_s`` seconds (times relative to now, ≤ 0),
    and how many are waiting for a prefill now (engines' queues and the handle's)."""

    span_s: float = Field(gt=0)
    arrivals_s: list[float] = []
    prompt_tokens: list[int] = []
    output_tokens: list[int] = []
    queued: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _aligned(self) -> "Window":
        if not len(self.arrivals_s) == len(self.prompt_tokens) == len(self.output_tokens):
            raise ValueError("arrivals, prompt and output lengths must be aligned")
        return self

    @property
    def rate(self) -> float:
        return len(self.arrivals_s) / self.span_s

    def trend(self, bins: int = 6) -> tuple[float, float]:
        """(rate now, slope in req/s per s) from a least-squares line through the arrival counts of ``bins`` equal
        parts of the window: what a forecast extrapolates (a line through all of them, not two halves, damps bursts)."""
        width = self.span_s / bins
        counts = [0] * bins
        for t in self.arrivals_s:
            counts[min(bins - 1, max(0, int((t + self.span_s) / width)))] += 1
        xs = [(i + 0.5) * width - self.span_s for i in range(bins)]  # bin centres, ≤ 0
        ys = [c / width for c in counts]
        mx, my = sum(xs) / bins, sum(ys) / bins
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return max(0.0, my - slope * mx), slope

    def burstiness(self) -> float:
        """Squared coefficient of variation of the inter-arrival gaps (1: Poisson); 1 when too few to tell."""
        ts = sorted(self.arrivals_s)
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        if len(gaps) < 8:
            return 1.0
        mean = sum(gaps) / len(gaps)
        var = sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)
        return var / mean**2 if mean > 0 else 1.0


class Mix(BaseModel):
    """The window's requests reduced to what ``predict`` needs: moments of the prefill time and mean lengths."""

    mean_prefill_s: float
    scv_prefill: float  # squared coefficient of variation of prefill times
    quantile_prefill_s: float
    mean_prompt: float
    mean_output: float
    scv_arrivals: float

    @classmethod
    def of(cls, window: Window, profile: ReplicaProfile, percentile: float) -> "Mix | None":
        if not window.prompt_tokens:
            return None
        s = sorted(profile.single_prefill_time(n) for n in window.prompt_tokens)
        mean = sum(s) / len(s)
        var = sum((x - mean) ** 2 for x in s) / len(s)
        return cls(mean_prefill_s=mean, scv_prefill=var / mean**2 if mean > 0 else 0.0,
                   quantile_prefill_s=s[min(len(s) - 1, int(percentile * len(s)))],
                   mean_prompt=sum(window.prompt_tokens) / len(s), mean_output=sum(window.output_tokens) / len(s),
                   scv_arrivals=window.burstiness())


class Prediction(BaseModel):
    replicas: int
    rate: float
    ttft_s: float  # the SLO's percentile; inf: overloaded
    tpot_s: float
    prefill_utilization: float
    running_per_replica: float
    limit: str = ""  # what broke, when something did: prefill, decode, KV

    ttft_floor_s: float = 0.0  # what no replica count removes: the percentile prompt's prefill and one step
    tpot_floor_s: float = 0.0  # a decode step of one sequence

    def meets(self, slo: SLOTarget, headroom: float) -> bool:
        """Within ``headroom`` of the slack each SLO leaves above its floor (where the floor passes the SLO, no count
        of replicas meets it: then within ``headroom`` of a quarter above the floor)."""
        def ok(value: float, floor: float, objective: float) -> bool:
            goal = objective if objective > floor else 1.25 * floor
            return value <= floor + headroom * (goal - floor)

        return ok(self.ttft_s, self.ttft_floor_s, slo.ttft_s) and ok(self.tpot_s, self.tpot_floor_s, slo.tpot_s)


def erlang_c(c: int, a: float) -> float:
    """Probability an arrival waits in M/M/c with offered load ``a`` erlangs (1 when a ≥ c)."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    b = 1.0
    for k in range(1, c + 1):  # Erlang B by recursion, then C from B
        b = a * b / (k + a * b)
    return b / (1 - (a / c) * (1 - b))


def predict(c: int, rate: float, mix: Mix, profile: ReplicaProfile, slo: SLOTarget) -> Prediction:
    """Predicted TTFT percentile and TPOT with ``c`` replicas at ``rate`` req/s of this mix (module docstring)."""
    context = mix.mean_prompt + mix.mean_output / 2
    one = profile.decode_time(1, context)
    floors = {"ttft_floor_s": mix.quantile_prefill_s + one, "tpot_floor_s": one}
    if rate <= 0:
        return Prediction(replicas=c, rate=rate, ttft_s=floors["ttft_floor_s"], tpot_s=one, prefill_utilization=0,
                          running_per_replica=0, **floors)
    if c < 1:
        return Prediction(replicas=c, rate=rate, ttft_s=INFEASIBLE, tpot_s=INFEASIBLE, prefill_utilization=INFEASIBLE,
                          running_per_replica=INFEASIBLE, limit="no replica", **floors)
    a = rate * mix.mean_prefill_s
    rho = a / c
    out = Prediction(replicas=c, rate=rate, ttft_s=INFEASIBLE, tpot_s=INFEASIBLE, prefill_utilization=rho,
                     running_per_replica=INFEASIBLE, **floors)
    if rho >= 1:
        return out.model_copy(update={"limit": "prefill"})
    per_replica, n, tpot = rate / c, 1.0, 0.0
    # running sequences fluctuate, by √N for Poisson arrivals and by √(ca²·N) for bursty ones: their percentile fits
    z = NormalDist().inv_cdf(slo.percentile) * math.sqrt(max(1.0, mix.scv_arrivals))
    seqs_fit = min(profile.max_seqs, profile.kv_capacity_tokens / (mix.mean_prompt + mix.mean_output))
    for _ in range(30):  # N = λ_r·E[out]·TPOT(N): monotone, converges when decode keeps up
        tpot = profile.decode_time(n, context) / (1 - rho)
        new = max(1.0, per_replica * mix.mean_output * tpot)
        if new + z * math.sqrt(new) > seqs_fit:
            return out.model_copy(update={"limit": "KV" if seqs_fit < profile.max_seqs else "decode"})
        if abs(new - n) < 1e-2:
            break
        n = new
    wait_p = erlang_c(c, a)
    tail = 1 - slo.percentile
    wait = 0.0
    if wait_p > tail:
        mean_wait = mix.mean_prefill_s * (mix.scv_arrivals + mix.scv_prefill) / 2 / (c - a)
        wait = mean_wait * math.log(wait_p / tail)
    step = profile.decode_time(n, context)
    return out.model_copy(update={"ttft_s": wait + mix.quantile_prefill_s + step, "tpot_s": tpot,
                                  "running_per_replica": n})


class PolicyState(BaseModel):
    """What ``decide`` remembers between calls: since when one replica fewer would have sufficed."""

    down_since_s: float | None = None


class Decision(BaseModel):
    desired: int
    reason: str
    predicted: Prediction | None = None  # at the desired count and the rate it was sized for
    state: PolicyState = PolicyState()


def _fewest(lo: int, hi: int, rate: float, mix: Mix, profile: ReplicaProfile, slo: SLOTarget,
            headroom: float) -> tuple[int, Prediction]:
    """The fewest replicas in [lo, hi] predicted to meet ``headroom`` × the SLO (else ``hi``), and that prediction."""
    start = min(hi, max(lo, math.ceil(rate * mix.mean_prefill_s) if rate > 0 else lo))  # fewer: prefill overloads
    if not predict(hi, rate, mix, profile, slo).meets(slo, headroom):
        return hi, predict(hi, rate, mix, profile, slo)
    while start < hi:  # bisect: the predicted latency only falls as replicas are added
        mid = (start + hi) // 2
        if predict(mid, rate, mix, profile, slo).meets(slo, headroom):
            hi = mid
        else:
            start = mid + 1
    return hi, predict(hi, rate, mix, profile, slo)


def decide(now_s: float, current: int, window: Window, profile: ReplicaProfile, slo: SLOTarget,
           settings: AutoscaleSettings, state: PolicyState = PolicyState()) -> Decision:
    """The replica count this pool should have now (``current`` counts replicas running and starting)."""
    lo, hi = settings.min_replicas, settings.max_replicas
    mix = Mix.of(window, profile, slo.percentile)
    if mix is None:  # nothing arrived in the window
        if window.queued:
            if current >= 1:  # the window has not counted their arrivals yet: nothing to size by
                return Decision(desired=max(current, lo), reason=f"hold: {window.queued} queued, no arrivals counted yet")
            return Decision(desired=max(lo, 1), reason=f"up: {window.queued} queued and no replica: start one")
        want = lo  # no traffic: down to the floor, after the delay
        since = state.down_since_s if state.down_since_s is not None else now_s
        if want < current and now_s - since < settings.downscale_delay_s:
            return Decision(desired=current, reason="idle; waiting out the downscale delay",
                            state=PolicyState(down_since_s=since))
        return Decision(desired=want, reason=f"idle: min_replicas {lo}" if want != current else "idle")
    ahead = window.rate
    if len(window.arrivals_s) >= 20:  # a trend read off fewer is noise
        now_rate, slope = window.trend()
        ahead = max(ahead, min(1.5 * window.rate, now_rate + max(0.0, slope) * settings.cold_start_s))
    up_rate = ahead + window.queued / settings.backlog_drain_s
    floor = max(lo, 1)
    need, pred = _fewest(floor, hi, up_rate, mix, profile, slo, settings.up_headroom)
    pct = f"p{round(slo.percentile * 100)}"

    def said(p: Prediction) -> str:
        if p.limit:
            return f"overload ({p.limit}-bound)"
        return f"TTFT {pct} {p.ttft_s:.2f}s, TPOT {p.tpot_s * 1e3:.0f}ms"

    if need > current:
        now_pred = predict(current, up_rate, mix, profile, slo)
        return Decision(desired=need, predicted=pred,
                        reason=f"up: at {up_rate:.2f} req/s (forecast {settings.cold_start_s:.0f}s ahead"
                               f"{f', {window.queued} queued' if window.queued else ''}) {current} replicas predict "
                               f"{said(now_pred)}{'' if now_pred.limit else f', past {settings.up_headroom:.0%} of the SLO'}"
                               f"; {need} predict {said(pred)}")
    down, down_pred = _fewest(floor, current, window.rate, mix, profile, slo, settings.down_headroom)
    down = max(down, need)
    if down < current:
        since = state.down_since_s if state.down_since_s is not None else now_s
        if now_s - since >= settings.downscale_delay_s:
            return Decision(desired=down, predicted=down_pred,
                            reason=f"down: at {window.rate:.2f} req/s {down} replicas predict {said(down_pred)}, "
                                   f"within {settings.down_headroom:.0%} of the SLO, for {now_s - since:.0f}s")
        return Decision(desired=current, predicted=pred, state=PolicyState(down_since_s=since),
                        reason=f"hold: {down} would do ({said(down_pred)}); cooling down "
                               f"{settings.downscale_delay_s - (now_s - since):.0f}s more")
    keep = max(lo, min(current, hi))
    kept = predict(keep, up_rate, mix, profile, slo)
    if keep == hi and not kept.meets(slo, settings.up_headroom):  # more would help, but max_replicas says no
        past = "" if kept.limit else f", past {settings.up_headroom:.0%} of the SLO"
        return Decision(desired=keep, predicted=kept,
                        reason=f"hold: at max_replicas {hi}, {up_rate:.2f} req/s predict {said(kept)}{past}")
    return Decision(desired=keep, predicted=kept, reason=f"hold: {keep} replicas at {up_rate:.2f} req/s")
