"""Where overflow goes: to the pool that carries it cheapest when a pool's SLO asks for more replicas, and, while a
scale-up is on its way, to a pool that still meets its TTFT objective.

``cost.autoscale.decide`` sizes one pool from its own traffic. With several pools that can hold the same requests
(other hardware, other device counts: each request goes to whichever the router predicts finishes it first), the
pool whose requests outgrew it is not always the one to grow: a replica of another pool may carry those requests
within the same SLO for less. ``place_growth`` takes every pool's own decision and moves each growth to the sibling
that carries it cheapest:

- the *overflow* of a pool that wants to grow is the rate it was sized for (``Prediction.rate``: forecast plus
  backlog) beyond what its current replicas carry within the SLO (``replica_rate``: the most requests per second one
  replica of a profile serves with this mix, its latency within ``up_headroom`` of the SLO, by bisection on
  ``predict``);
- a sibling can take it when every request of the pool's window fits its context, it has a replica serving (the
  router only spills to a pool that answers) and room under its ``max_replicas`` for the replicas the overflow needs
  beyond the ones its own traffic leaves idle;
- of those, the one with the lowest price per request/s carried within the SLO (``unit_costs``; the price of a
  replica-hour is the catalog's device-hour price times its devices, or device-hours when a pool has no price) takes
  it if that is lower than the pool's own; otherwise it grows at home.

The pool that hands its growth over holds its count (it still has a replica: requests sent only to it are served);
its requests queue there a little, so the router, which prices the whole request, spills them to the sibling that is
starting or has room (``spill``, in ``app/serve/admission.py``). Once they run there, the sibling's own window
carries them and its own ``decide`` keeps them. Overflow is priced with the requesting pool's SLO and mix: its
requests keep their promise wherever they run. Pools are ranked by one order (``unit_costs``: for every pool's
traffic together, under the strictest SLO), so growth never moves back and forth between two pools.

Where it stands: the simulator runs it (``--autoscale slo-cheapest``) against each pool sized alone (``slo``); over
four pairs of GPU pools, 3 seeds each, it cost 0.74-0.91x on one pair, 1.02-1.05x on another, and either way on the
other two (BENCHMARKS.md, "Autoscaling across pools"), so in Serve it is opt-in (``autoscaling.grow: cheapest``,
``app/serve/slo_policy.py``: each pool's policy computes the same plan from its siblings' last views). What limits
it: the cheapest pool is usually the one the overflow spills to anyway, and a sibling's replicas start no sooner than
the pool's own would have. ``spill`` is used by the router (``app.serve.admission``) and the simulator alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from cost.autoscale import AutoscaleSettings, Decision, Mix, ReplicaProfile, SLOTarget, Window, predict

RATE_STEPS = 24  # bisection steps of ``replica_rate`` (its bracket shrinks 2^24-fold)


class Option(NamedTuple):
    """A pool priced for one request: seconds to its first token, of which queueing, and to its last; the pool's TTFT
    objective (None: it has none); whether it may still add a replica (below its ``max_replicas``)."""

    ttft_s: float
    wait_s: float
    finish_s: float
    ttft_slo_s: float | None = None
    grows: bool = True


def spill(options: Sequence[Option]) -> int:
    """Which of ``options`` takes the request: the one finishing first (the first of equals), except that a pool
    whose queue alone pushes the first token past its TTFT objective, and which may still grow, is passed over while
    another pool meets its own. That is a pool waiting for its scale-up: it would meet the objective with room, so
    its requests go where there is room meanwhile. Without the rule they go where they finish first, which is the
    faster pool even with seconds of queue before the first token. A pool at its ``max_replicas`` has no scale-up to
    wait out: its queue is what it is, and spilling would trade every spilled request's finish for its first token
    (the shipped config at concurrency 16: 40% of short prompts spilled to ``long``, finishing in 16-18 s against
    8-10 s, and 0.73x the tokens/s of keeping them on ``short``; BENCHMARKS.md)."""
    def late(o: Option) -> bool:
        return o.grows and o.ttft_slo_s is not None and o.ttft_s - o.wait_s <= o.ttft_slo_s < o.ttft_s

    def timely(o: Option) -> bool:
        return o.ttft_slo_s is None or o.ttft_s <= o.ttft_slo_s

    keep = [i for i, o in enumerate(options) if not late(o)]
    if not keep or not any(timely(options[i]) for i in keep):
        keep = list(range(len(options)))
    return min(keep, key=lambda i: options[i].finish_s)


class PoolView(BaseModel):
    """One pool at a control tick, as its siblings see it: what it is, what it saw, and what it decided alone."""

    model_config = ConfigDict(frozen=True)
    name: str
    profile: ReplicaProfile  # calibrated by its replicas' measurements
    slo: SLOTarget
    settings: AutoscaleSettings
    current: int  # replicas running and starting
    context_tokens: int  # the longest request (prompt + output) it holds
    price_per_replica_hour: float | None  # None: not priced (then every pool is compared by device-hours)
    window: Window
    decision: Decision  # ``decide``'s answer for this pool alone


def replica_rate(profile: ReplicaProfile, mix: Mix, slo: SLOTarget, headroom: float) -> float:
    """The most requests per second of ``mix`` one replica of ``profile`` serves predicted within ``headroom`` of
    ``slo`` (0 when even one request at a time misses it)."""
    def meets(rate: float) -> bool:
        return predict(1, rate, mix, profile, slo).meets(slo, headroom)

    hi = 1 / mix.mean_prefill_s if mix.mean_prefill_s > 0 else 1e6  # prefill alone saturates past this
    if not meets(hi * 1e-6):
        return 0.0
    lo = hi * 1e-6
    for _ in range(RATE_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


def idle_share(view: PoolView, replicas: int) -> float:
    """The share of ``replicas`` replicas of ``view``'s pool its own traffic leaves free (by the rate it was sized for
    against what they carry within its SLO; all of it with no traffic)."""
    if replicas < 1:
        return 0.0
    if not view.window.prompt_tokens:
        return 1.0
    mix = Mix.of(view.window, view.profile, view.slo.percentile)
    rate = view.decision.predicted.rate if view.decision.predicted is not None else view.window.rate
    carries = replicas * replica_rate(view.profile, mix, view.slo, view.settings.up_headroom)
    return max(0.0, 1 - rate / carries) if carries > 0 else 0.0


def unit_costs(views: list[PoolView], by_devices: bool) -> dict[str, float]:
    """Each pool's price per request/s it carries within the SLO, for the group's traffic (every pool's window
    together) under the strictest SLO among them: one order for every pool, so growth only ever moves one way."""
    merged = Window(span_s=max(v.window.span_s for v in views),
                    arrivals_s=[t for v in views for t in v.window.arrivals_s],
                    prompt_tokens=[n for v in views for n in v.window.prompt_tokens],
                    output_tokens=[n for v in views for n in v.window.output_tokens])
    strict = SLOTarget(ttft_s=min(v.slo.ttft_s for v in views), tpot_s=min(v.slo.tpot_s for v in views),
                       percentile=max(v.slo.percentile for v in views))
    out = {}
    for v in views:
        mix = Mix.of(merged, v.profile, strict.percentile)
        rate = replica_rate(v.profile, mix, strict, v.settings.up_headroom) if mix is not None else 0.0
        out[v.name] = _price(v, by_devices) / rate if rate > 0 else math.inf
    return out


def _price(view: PoolView, by_devices: bool) -> float:
    return float(view.profile.devices) if by_devices else float(view.price_per_replica_hour or 0.0)


def place_growth(views: list[PoolView]) -> dict[str, Decision]:
    """Each pool's decision with growth placed where it costs least (module docstring); pools in ``views`` order."""
    out = {v.name: v.decision for v in views}
    growing = [v for v in views if v.decision.desired > v.current >= 1 and v.decision.predicted is not None
               and v.window.prompt_tokens]
    if not growing:  # the common case, every control loop: nothing to price
        return out
    by_devices = any(v.price_per_replica_hour is None for v in views)
    planned = {v.name: v.decision.desired for v in views}  # a pool going down keeps what an overflow needs
    added = dict.fromkeys(planned, 0)  # replicas a pool grows by for its siblings' overflow
    free = {v.name: planned[v.name] * idle_share(v, planned[v.name]) for v in views}  # in replicas its own leave
    unit = unit_costs(views, by_devices)
    for v in growing:
        want = v.decision.desired - v.current
        mix = Mix.of(v.window, v.profile, v.slo.percentile)
        overflow = v.decision.predicted.rate - v.current * replica_rate(v.profile, mix, v.slo, v.settings.up_headroom)
        longest = max(p + o for p, o in zip(v.window.prompt_tokens, v.window.output_tokens))
        here = unit[v.name]
        best: tuple[float, int, float, PoolView] | None = None
        for s in views:
            if s is v or s.current < 1 or s.context_tokens < longest or overflow <= 0:
                continue
            rate = replica_rate(s.profile, mix, v.slo, v.settings.up_headroom)
            if rate <= 0:
                continue
            needs = overflow / rate  # replicas of ``s`` the overflow occupies, its idle ones first
            extra = max(0, math.ceil(needs - free[s.name] - 1e-9))
            cost = unit[s.name]
            if planned[s.name] + extra <= s.settings.max_replicas and cost < here and (best is None or cost < best[0]):
                best = (cost, extra, needs, s)
        if best is None:
            continue
        cost, extra, needs, s = best
        free[s.name] = max(0.0, free[s.name] + extra - needs)
        added[s.name] += extra
        planned[s.name] += extra
        planned[v.name] = v.current + added[v.name]
        per = "device-h" if by_devices else "$"
        costs = f"{cost:.3g} {per} per request/s carried there against {here:.3g} in {v.name}"
        if out[s.name].desired != planned[s.name]:
            out[s.name] = out[s.name].model_copy(update={
                "desired": planned[s.name],
                "reason": f"up: +{extra} for pool {v.name}'s overflow ({overflow:.2f} req/s past its {v.current} "
                          f"replicas; {costs}); {out[s.name].reason}"})
        out[v.name] = out[v.name].model_copy(update={
            "desired": planned[v.name],
            "reason": f"{'up' if added[v.name] else 'hold'}: pool {s.name} takes this pool's overflow "
                      f"({overflow:.2f} req/s) with {f'+{extra}' if extra else 'its idle replicas'} instead of "
                      f"+{want} here ({costs}); {out[v.name].reason}"})
    return out
