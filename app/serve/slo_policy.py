"""The ``slo`` autoscaling policy as Serve runs it: ``cost.autoscale.decide`` fed by what a pool's replicas report.

Why here and like this: Serve 2.60 calls a deployment's ``autoscaling_config.policy`` in its controller every control
loop (0.1 s) with an ``AutoscalingContext``: the replica count it targets, requests queued in handles, and each
running replica's ``record_autoscaling_stats`` values as time series over ``look_back_period_s``. A value is a float,
so a replica cannot hand over its requests one by one; it reports cumulative counters (``Traffic``: arrivals, their
prompt tokens and ``max_tokens``, finished requests and the tokens they generated) and ``read_window`` turns each
replica's consecutive samples back into requests: the k arrivals between two samples spread evenly between them with
that interval's mean lengths (so burstiness is seen between samples, not within one), outputs at the window's mean
generated length. The replicas' measurements calibrate the profile (``ReplicaProfile.calibrated``: an uncalibrated
CPU can be off by a constant, not the same for prefill and decode): prefill by a warm prefill each replica times at
its start against the planner's prediction, decode by the step time the engines measure as they run against the
profile's for their batch (which includes what the machine's other load costs); their KV blocks set its KV room. ``SLOPolicy`` is instantiated once per deployment config by the controller (``policy_kwargs``: the pool's
profile, built by the planner at ``build_app``, its SLO and settings), keeps ``decide``'s state in Serve's policy
state, logs each decision that changes the count or its verdict, and sets ``dynpart_desired_replicas`` and
``dynpart_predicted_ttft_seconds`` from the controller's process (Ray metrics export from any actor). With
``autoscaling.grow: cheapest`` the decision is then placed across the app's pools that say the same (``placed``,
``cost.growth.place_growth``): the controller runs every deployment's policy in its one process, so they meet in a
module-level registry.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cost.autoscale import AutoscaleSettings, Decision, PolicyState, ReplicaProfile, SLOTarget, Window, decide
from cost.growth import PoolView, place_growth

logger = logging.getLogger("ray.serve")

COUNTERS = ("arrivals", "prompt_tokens", "max_tokens", "finished", "output_tokens")
LOG_EVERY_S = 30.0  # a verdict that holds is logged again after this long
SPEED_BOUNDS = (0.1, 10.0)  # measured / predicted step: beyond these the measurement is noise (a step in warm-up)


@dataclass
class Done:
    tokens: int = 0  # what the request generated, set by the replica as it goes


class Traffic:
    """One replica's cumulative counters, reported to Serve's controller by ``record_autoscaling_stats``."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTERS, 0)

    @contextlib.contextmanager
    def request(self, prompt_tokens: int, max_tokens: int) -> Iterator[Done]:
        """Counts the request on arrival, and what it generated once it ends (however it ends)."""
        c, done = self.counts, Done()
        c["arrivals"] += 1
        c["prompt_tokens"] += prompt_tokens
        c["max_tokens"] += max_tokens
        try:
            yield done
        finally:
            c["finished"] += 1
            c["output_tokens"] += done.tokens

    def stats(self, waiting: int, running: int, step_s: float, prefill_speed: float,
              kv_tokens: int) -> dict[str, float]:
        return {**self.counts, "waiting": waiting, "running": running, "step_s": step_s,
                "prefill_speed": prefill_speed, "kv_tokens": kv_tokens}


@dataclass
class Measured:
    """The replicas' latest engine figures (means over replicas; ``waiting`` summed; ``kv_tokens`` the smallest)."""

    waiting: int = 0
    running: float = 0.0  # sequences decoding per replica
    step_s: float = 0.0  # the engine's step time as it runs (a moving average)
    prefill_speed: float = 1.0  # a warm prefill measured at start over the planner's prediction for it
    kv_tokens: int = 0


def read_window(raw: Mapping[str, Mapping[Any, list]], now_s: float, look_back_s: float,
                queued_in_handles: int = 0) -> tuple[Window, Measured]:
    """The requests the replicas' counters say arrived over the look-back period (module docstring), and their
    latest engine figures. ``raw``: ``AutoscalingContext.raw_metrics`` (metric → replica → timestamped samples)."""
    arrivals, prompts, maxes = [], [], []
    finished = generated = 0
    span = 0.0
    latest: list[dict[str, float]] = []
    for replica, series in raw.get("arrivals", {}).items():
        samples = {key: {p.timestamp: p.value for p in raw.get(key, {}).get(replica, [])} for key in raw}
        times = sorted(samples["arrivals"])
        if not times:
            continue
        latest.append({key: samples[key].get(times[-1], 0.0) for key in samples})
        span = max(span, times[-1] - times[0])
        for t0, t1 in zip(times, times[1:]):
            delta = {key: max(0.0, samples[key].get(t1, 0.0) - samples[key].get(t0, 0.0)) for key in COUNTERS}
            finished += delta["finished"]
            generated += delta["output_tokens"]
            k = round(delta["arrivals"])
            for i in range(k):
                arrivals.append(min(0.0, t0 + (i + 1) * (t1 - t0) / k - now_s))
                prompts.append(max(1, round(delta["prompt_tokens"] / k)))
                maxes.append(max(1, round(delta["max_tokens"] / k)))
    mean_out = generated / finished if finished else None
    outputs = [max(1, round(mean_out)) if mean_out else m for m in maxes]
    span = min(look_back_s, max(span, 1.0)) if arrivals else look_back_s
    arrivals = [max(-span, t) for t in arrivals]
    measured = Measured()
    if latest:
        n = len(latest)
        measured = Measured(waiting=int(sum(x.get("waiting", 0) for x in latest)),
                            running=sum(x.get("running", 0) for x in latest) / n,
                            step_s=sum(x.get("step_s", 0) for x in latest) / n,
                            prefill_speed=sum(x.get("prefill_speed", 1) for x in latest) / n,
                            kv_tokens=int(min(x.get("kv_tokens", 0) for x in latest)))
    window = Window(span_s=span, arrivals_s=arrivals, prompt_tokens=prompts, output_tokens=outputs,
                    queued=measured.waiting + max(0, int(queued_in_handles)))
    return window, measured


def speeds(profile: ReplicaProfile, measured: Measured, window: Window) -> tuple[float, float]:
    """(prefill, decode): measured over predicted, each within ``SPEED_BOUNDS`` (1: not measured yet). Decode: the
    step as the engines run it now against the profile's for their running batch and the window's context, so it
    carries what the machine's other load costs (and, conservatively, the prefill chunks those steps also ran)."""
    def bounded(x: float) -> float:
        return min(SPEED_BOUNDS[1], max(SPEED_BOUNDS[0], x))

    decode = 1.0
    if measured.step_s > 0 and window.prompt_tokens:
        n = len(window.prompt_tokens)
        context = sum(window.prompt_tokens) / n + sum(window.output_tokens) / n / 2
        predicted = profile.decode_time(max(1.0, measured.running), context)
        decode = bounded(measured.step_s / predicted) if predicted > 0 else 1.0
    return bounded(measured.prefill_speed), decode


SIBLINGS: dict[str, dict[str, tuple[float, PoolView]]] = {}  # app -> pool -> (when, its last view): ``grow: cheapest``
SIBLING_STALE_S = 5.0  # a sibling's view older than this is left out (its policy stopped being called)


def placed(app: str, view: PoolView, now: float) -> Decision:
    """``view``'s decision with growth placed across the app's ``grow: cheapest`` pools (``cost.growth``). Serve's
    controller calls every deployment's policy in its one process, so each pool's policy leaves its latest view here
    and computes the same plan from its siblings' latest ones."""
    pools = SIBLINGS.setdefault(app, {})
    pools[view.name] = (now, view)
    fresh = [v for t, v in pools.values() if now - t <= SIBLING_STALE_S]
    return place_growth(fresh)[view.name] if len(fresh) > 1 else view.decision


class SLOPolicy:
    """Serve's custom autoscaling policy for one pool's engine deployment (``autoscaling.policy: slo``)."""

    def __init__(self, pool: str, profile: dict, slo: dict, settings: dict, grow: str = "own",
                 context_tokens: int = 0, price_per_replica_hour: float | None = None):
        self.pool, self.profile = pool, ReplicaProfile(**profile)
        self.slo, self.settings = SLOTarget(**slo), AutoscaleSettings(**settings)
        self.grow, self.context_tokens, self.price = grow, context_tokens, price_per_replica_hour
        self._calibrated: tuple[tuple[float, float, int], ReplicaProfile] = ((1.0, 1.0, 0), self.profile)
        self._logged: tuple[str, int, float] = ("", -1, -math.inf)  # verdict, count, when

    def profile_for(self, measured: Measured, window: Window) -> ReplicaProfile:
        """The profile calibrated by the replicas' measurements (reused while they move less than 5%: its memo)."""
        key = (*speeds(self.profile, measured, window), measured.kv_tokens)
        old = self._calibrated[0]
        if old[2] != key[2] or any(abs(new / was - 1) > 0.05 for new, was in zip(key[:2], old[:2])):
            self._calibrated = key, self.profile.calibrated(*key)
        return self._calibrated[1]

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        from app.serve.metrics import set_autoscale

        now = ctx.current_time
        window, measured = read_window(ctx.raw_metrics or {}, now, self.settings.window_s,
                                       int(ctx.total_queued_requests or 0))
        state = PolicyState(**ctx.policy_state.get("slo", {}))
        target = ctx.target_num_replicas
        profile = self.profile_for(measured, window)
        decision = decide(now, target, window, profile, self.slo, self.settings, state)
        if self.grow == "cheapest":
            decision = placed(ctx.app_name or "", PoolView(
                name=self.pool, profile=profile, slo=self.slo, settings=self.settings, current=target,
                context_tokens=self.context_tokens, price_per_replica_hour=self.price, window=window,
                decision=decision), now)
        desired = max(decision.desired, self.settings.min_replicas)
        verdict = decision.reason.split(":")[0]
        if (verdict, desired) != self._logged[:2] or now - self._logged[2] >= LOG_EVERY_S:
            (prefill, decode, _), n = self._calibrated[0], len(window.prompt_tokens)
            logger.info("slo policy, pool %s: %d -> %d replicas: %s [%d requests in %.0fs, prompts %.0f tokens on "
                        "average; planner's times x%.2f prefill, x%.2f decode]", self.pool, target, desired,
                        decision.reason, n, window.span_s, sum(window.prompt_tokens) / max(1, n), prefill, decode)
            self._logged = verdict, desired, now
        ttft = decision.predicted.ttft_s if decision.predicted is not None else None
        set_autoscale(ctx.app_name or "", self.pool, desired, ttft)
        return desired, {"slo": decision.state.model_dump()}


def autoscaling_policy(pool, shape) -> dict[str, Any]:
    """``autoscaling_config.policy`` of a pool (``PoolConfig``) under ``slo``: this class, and its ``policy_kwargs``
    (JSON, as Serve wants them): the pool's replica tabulated by the planner for its hardware, devices, context and
    batch limits, its SLO, and the policy's settings from the pool's ``autoscaling`` keys."""
    from cost.autoscale_sim import replica_profile
    from cost.simulator import Pool

    scaling = pool.autoscaling
    context = pool.context(shape.max_position_embeddings)
    profile = replica_profile(shape.model_copy(update={"max_position_embeddings": context}),
                              Pool(hardware=pool.priced_hardware(), devices=pool.devices),
                              max_batched_tokens=pool.max_num_batched_tokens, max_seqs=pool.max_num_seqs)
    settings = AutoscaleSettings(min_replicas=scaling.min_replicas, max_replicas=scaling.max_replicas,
                                 cold_start_s=scaling.cold_start_s, downscale_delay_s=scaling.downscale_delay_s,
                                 window_s=(scaling.model_extra or {}).get("look_back_period_s", 30.0))
    price = pool.priced_hardware().price_per_hour
    return {"policy_function": f"{__name__}:SLOPolicy",
            "policy_kwargs": {"pool": pool.name, "profile": profile.model_dump(mode="json"),
                              "slo": pool.slo.model_dump(), "settings": settings.model_dump(),
                              "grow": scaling.grow, "context_tokens": context,
                              "price_per_replica_hour": None if price is None else price * pool.devices}}
