"""The cluster simulator with autoscaling: a trace through pools whose replica counts a policy sets as it runs.

Four policies over the same trace and cluster: ``slo`` (``cost.autoscale.decide`` per pool, the code the Serve policy
calls), ``slo-cheapest`` (the same, then ``cost.growth.place_growth`` moving a pool's growth to the pool that carries
its overflow cheapest; several pools only; in Serve a pool's opt-in ``autoscaling.grow: cheapest``: BENCHMARKS.md),
``serve-default`` (Ray Serve's default: ceil(ongoing requests averaged over ``look_back_period_s`` /
``target_ongoing_requests``), applied after it has held for ``upscale_delay_s`` / ``downscale_delay_s``) and
``fixed`` (the pool's replica count throughout). A new replica serves after ``cold_start_s`` and is billed from its
start; a removed one takes no new requests and is billed until its last one finishes. A request goes to the pool
Serve's router would pick (priced whole, queue and KV slots included, through ``cost.growth.spill``); within a pool,
to the replica whose prefill starts soonest.

Each replica runs the continuous-batching loop of ``cost.simulator`` (a prefill pass when waiting prompts fit the
token budget and the KV cache, else a decode step of every running sequence; KV reserved for prompt + output at
admission), priced by the pool's ``ReplicaProfile`` (the planner's step times, tabulated) so that a 64-replica run
takes seconds: decode steps run in stretches up to the next sequence's end, cut at the next step boundary when a
request arrives. A request no replica can take yet waits in its pool's queue (Serve's handle queue) for one.
Attainment is ``vllm bench serve --goodput``'s: the share of requests meeting every SLO. These are predictions.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from cost.autoscale import AutoscaleSettings, PolicyState, ReplicaProfile, SLOTarget, Window, decide
from cost.growth import Option, PoolView, place_growth, spill
from cost.planner import DEFAULT_UTILIZATION, decode_step_time, plan_prefill
from cost.simulator import Percentiles, Pool, _percentiles, _replicas, take_prefill_batch
from cost.workloads import Request
from strategies.shapes import ModelShape

AUTOSCALERS = ("slo", "slo-cheapest", "serve-default", "fixed")


class ServeDefault(BaseModel):
    """Ray Serve's default request-based policy and its defaults (``AutoscalingConfig``, Ray 2.60)."""

    target_ongoing_requests: float = Field(2.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)


class ScaleEvent(BaseModel):
    time_s: float
    pool: str
    replicas_from: int
    replicas_to: int
    reason: str


class AutoscaleResult(BaseModel):
    autoscaler: str
    completed: int
    rejected: int
    slo_attainment: float  # share of all requests meeting every SLO (goodput's numerator over the total)
    goodput_rps: float
    ttft_s: Percentiles | None
    tpot_s: Percentiles | None
    replica_hours: float
    device_hours: float
    cost_usd: float | None  # None when a pool's hardware has no price_per_hour
    peak_replicas: int
    mean_replicas: float
    span_s: float
    events: list[ScaleEvent] = []


def replica_profile(shape: ModelShape, pool: Pool, max_batched_tokens: int = 4096, max_seqs: int = 256,
                    utilization: float = DEFAULT_UTILIZATION) -> ReplicaProfile:
    """A pool's replica tabulated from the planner: what it keeps resident under the dynamic policy (so its KV room),
    prefill passes on a grid of batch × length, decode steps on a grid of batch × context."""
    one = pool.model_copy(update={"replicas": 1})
    rep = _replicas(shape, [one], "dynamic", max_batched_tokens, max_seqs, utilization)[0]
    hw, p, ctx = pool.hardware, pool.devices, shape.max_position_embeddings
    top = max(max_batched_tokens, ctx)
    totals = tuple(sorted({min(top, round(16 * 2 ** (i / 2))) for i in range(2 * int(math.log2(top / 16)) + 1)}
                          | {top}))
    batches = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= max_seqs)

    def prefill(k: int, total: int) -> float:  # k prompts sharing ``total`` tokens (at least one each)
        n = max(1, round(total / k))
        return plan_prefill(shape, hw, p, [n] * k, available=rep.strategies, utilization=utilization).time_s

    contexts = tuple(sorted({64, 256, 1024, ctx // 2, ctx}))
    dbatches = tuple(b for b in (1, 8, 32, 64, 128, 256) if b <= max_seqs) or (1,)
    return ReplicaProfile(
        name=f"{p}x{hw.name}", devices=p, kv_capacity_tokens=rep.kv_capacity, max_seqs=max_seqs,
        max_batched_tokens=max_batched_tokens, prefill_batches=batches, prefill_tokens=totals,
        prefill_s=tuple(tuple(prefill(k, n) for n in totals) for k in batches),
        decode_batches=dbatches, decode_contexts=contexts,
        decode_s=tuple(tuple(decode_step_time(shape, hw, p, [c] * b) for c in contexts) for b in dbatches))


@dataclass(eq=False)
class _Req:
    spec: Request
    prefill_s: float  # predicted, alone: what the router and the backlog count
    generated: int = 0
    first_token_s: float = -1.0
    end_s: float = -1.0

    @property
    def kv(self) -> int:
        return self.spec.prompt_tokens + self.spec.output_tokens


@dataclass(eq=False)
class _Replica:
    pool: "_Pool"
    started_s: float
    ready_s: float
    ready: bool = False
    draining: bool = False
    stopped_s: float | None = None
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    kv_used: int = 0
    pending_s: float = 0.0  # predicted prefill seconds waiting
    epoch: int = 0
    # the iteration in flight: kind ("prefill" | "decode" | ""), start, step seconds, steps, requests
    kind: str = ""
    it_start: float = 0.0
    it_step: float = 0.0
    it_steps: int = 0
    it_reqs: list = field(default_factory=list)

    @property
    def ongoing(self) -> int:
        return len(self.waiting) + len(self.running) + (len(self.it_reqs) if self.kind == "prefill" else 0)

    def backlog(self, now: float) -> float:
        """Predicted seconds before a new prompt's prefill could start here."""
        if self.kind == "prefill":
            busy = self.it_start + self.it_step - now
        elif self.kind == "decode":
            busy = self.it_step
        else:
            busy = 0.0
        return max(0.0, busy) + self.pending_s

    def slot_wait(self, kv: int) -> float:
        """Predicted seconds until a request needing ``kv`` tokens fits beside what runs and waits here (KV and
        ``max_seqs``): the running sequences end in order of the tokens they have left, a decode step each."""
        prof = self.pool.profile
        over = self.kv_used + sum(r.kv for r in self.waiting) + kv - prof.kv_capacity_tokens
        seats = len(self.running) + len(self.waiting) + 1 - prof.max_seqs
        if (over <= 0 and seats <= 0) or not self.running:
            return 0.0
        ctx = sum(r.spec.prompt_tokens + r.generated for r in self.running) / len(self.running)
        step = prof.decode_time(len(self.running), ctx)
        left = 0
        for r in sorted(self.running, key=lambda r: r.spec.output_tokens - r.generated):
            over, seats, left = over - r.kv, seats - 1, r.spec.output_tokens - r.generated
            if over <= 0 and seats <= 0:
                break
        return left * step

    def priced(self, spec: Request, now: float) -> Option:
        """The request here as the service's router prices a pool: the wait, its prefill, its decode steps beside
        what runs."""
        prof = self.pool.profile
        ctx = spec.prompt_tokens + spec.output_tokens / 2
        wait = self.backlog(now) + self.slot_wait(spec.prompt_tokens + spec.output_tokens)
        ttft = wait + prof.single_prefill_time(spec.prompt_tokens)
        return Option(ttft, wait, ttft + (spec.output_tokens - 1) * prof.decode_time(len(self.running) + 1, ctx))


@dataclass(eq=False)
class _Pool:
    name: str
    profile: ReplicaProfile
    price_per_replica_hour: float | None
    fixed: int
    replicas: list = field(default_factory=list)
    queue: deque = field(default_factory=deque)  # requests waiting for a replica (Serve's handle queue)
    window: deque = field(default_factory=deque)  # (arrival, prompt, output) of recent requests
    ongoing: deque = field(default_factory=deque)  # (time, ongoing requests): serve-default's look-back
    state: PolicyState = field(default_factory=PolicyState)
    serve_since: float | None = None
    serve_dir: int = 0

    @property
    def live(self) -> list[_Replica]:  # running or starting, not leaving
        return [r for r in self.replicas if not r.draining and r.stopped_s is None]


class _Cluster:
    """The event loop: arrivals, iteration ends, replicas becoming ready, control ticks."""

    def __init__(self, pools: list[_Pool], autoscaler: str, slo: SLOTarget, settings: AutoscaleSettings,
                 serve: ServeDefault, tick_s: float, max_ongoing: int):
        self.pools, self.autoscaler, self.slo, self.settings, self.serve = pools, autoscaler, slo, settings, serve
        self.tick_s, self.max_ongoing = tick_s, max_ongoing
        self.events: list = []
        self.seq = itertools.count()
        self.done: list[_Req] = []
        self.rejected = 0
        self.log: list[ScaleEvent] = []
        self.samples: list[tuple[float, int]] = []

    def push(self, t: float, kind: str, obj) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, obj))

    # --- replicas -------------------------------------------------------------------------------------------
    def add_replica(self, pool: _Pool, now: float, ready_now: bool = False) -> None:
        rep = _Replica(pool, started_s=now, ready_s=now if ready_now else now + self.settings.cold_start_s)
        pool.replicas.append(rep)
        if ready_now:
            rep.ready = True
        else:
            self.push(rep.ready_s, "ready", rep)

    def remove_replica(self, pool: _Pool, now: float) -> None:
        live = pool.live
        starting = [r for r in live if not r.ready]
        rep = starting[-1] if starting else min(live, key=lambda r: (r.ongoing, -r.started_s))
        rep.draining = True
        if not rep.ready or (rep.kind == "" and rep.ongoing == 0):
            rep.stopped_s = now

    def scale(self, pool: _Pool, desired: int, now: float, reason: str) -> None:
        current = len(pool.live)
        if desired == current:
            return
        self.log.append(ScaleEvent(time_s=now, pool=pool.name, replicas_from=current, replicas_to=desired,
                                   reason=reason))
        for _ in range(desired - current):
            self.add_replica(pool, now)
        for _ in range(current - desired):
            self.remove_replica(pool, now)

    # --- requests -------------------------------------------------------------------------------------------
    def accepting(self, pool: _Pool) -> list[_Replica]:
        return [r for r in pool.replicas if r.ready and not r.draining and r.ongoing < self.max_ongoing]

    def route(self, req: _Req, pool: _Pool, now: float) -> bool:
        """To the replica whose prefill would start soonest; False when none takes more (Serve's
        ``max_ongoing_requests``): the request then waits in the pool's queue."""
        ready = self.accepting(pool)
        if not ready:
            return False
        rep = min(ready, key=lambda r: (r.backlog(now), len(r.running)))
        rep.waiting.append(req)
        rep.pending_s += req.prefill_s
        if rep.kind == "":
            self.start(rep, now)
        elif rep.kind == "decode":
            self.cut(rep, now)
        return True

    def drain_queue(self, pool: _Pool, now: float) -> None:
        while pool.queue and self.route(pool.queue[0], pool, now):
            pool.queue.popleft()

    def choose(self, spec: Request, fits: list[_Pool], now: float) -> _Pool:
        """The pool Serve's router picks (``app.serve.admission`` through ``cost.growth.spill``): where the request
        finishes first, a pool whose queue breaks the TTFT objective passed over while another meets it, if the
        pool may still grow (a fixed count, or at ``max_replicas``, has no scale-up to wait out)."""
        inf = Option(math.inf, 0.0, math.inf)
        best = [min((r.priced(spec, now) for r in self.accepting(p)), default=inf, key=lambda o: o.finish_s)
                for p in fits]
        return fits[spill([o._replace(ttft_slo_s=self.slo.ttft_s, grows=self.grows(p)) for o, p in zip(best, fits)])]

    def grows(self, pool: _Pool) -> bool:
        return self.autoscaler != "fixed" and len(pool.live) < self.settings.max_replicas

    def arrive(self, spec: Request, now: float) -> None:
        fits = [p for p in self.pools if spec.prompt_tokens + spec.output_tokens <= p.profile.kv_capacity_tokens]
        if not fits:
            self.rejected += 1
            return
        pool = fits[0] if len(fits) == 1 else self.choose(spec, fits, now)
        pool.window.append((now, spec.prompt_tokens, spec.output_tokens))
        req = _Req(spec, pool.profile.single_prefill_time(spec.prompt_tokens))
        if pool.queue or not self.route(req, pool, now):  # first come, first served
            pool.queue.append(req)

    # --- one replica's engine -------------------------------------------------------------------------------
    def start(self, rep: _Replica, now: float) -> None:
        """The next iteration: a prefill pass if waiting prompts fit, else a stretch of decode steps."""
        prof = rep.pool.profile
        batch = take_prefill_batch(rep.waiting, prof.max_seqs - len(rep.running), prof.max_batched_tokens,
                                   prof.kv_capacity_tokens - rep.kv_used, lambda r: r.kv)
        rep.pending_s -= sum(r.prefill_s for r in batch)
        rep.kv_used += sum(r.kv for r in batch)
        rep.epoch += 1
        if batch:
            dur = prof.batch_prefill_time([r.spec.prompt_tokens for r in batch])
            rep.kind, rep.it_start, rep.it_step, rep.it_steps, rep.it_reqs = "prefill", now, dur, 1, batch
            self.push(now + dur, "done", (rep, rep.epoch))
        elif rep.running:
            steps = min(r.spec.output_tokens - r.generated for r in rep.running)
            ctx = sum(r.spec.prompt_tokens + r.generated for r in rep.running) / len(rep.running) + steps / 2
            step = prof.decode_time(len(rep.running), ctx)
            rep.kind, rep.it_start, rep.it_step, rep.it_steps, rep.it_reqs = "decode", now, step, steps, rep.running
            self.push(now + steps * step, "done", (rep, rep.epoch))
        else:
            rep.kind, rep.it_reqs = "", []
            if rep.draining:
                rep.stopped_s = now

    def cut(self, rep: _Replica, now: float) -> None:
        """A prompt arrived during a decode stretch: end the stretch after the step in flight."""
        steps = min(rep.it_steps, math.floor((now - rep.it_start) / rep.it_step) + 1)
        if steps < rep.it_steps:
            rep.it_steps = steps
            rep.epoch += 1
            self.push(rep.it_start + steps * rep.it_step, "done", (rep, rep.epoch))

    def finish(self, rep: _Replica, now: float) -> None:
        if rep.kind == "prefill":
            for r in rep.it_reqs:
                r.generated, r.first_token_s = 1, now
            rep.running.extend(rep.it_reqs)
        else:
            for r in rep.running:
                r.generated += rep.it_steps
        for r in [r for r in rep.running if r.generated >= r.spec.output_tokens]:
            rep.running.remove(r)
            rep.kv_used -= r.kv
            r.end_s = now
            self.done.append(r)
        rep.kind = ""
        self.start(rep, now)
        if rep.pool.queue:
            self.drain_queue(rep.pool, now)

    # --- policies -------------------------------------------------------------------------------------------
    def control(self, now: float) -> None:
        views = []
        for pool in self.pools:
            while pool.window and pool.window[0][0] < now - self.settings.window_s:
                pool.window.popleft()
            ongoing = len(pool.queue) + sum(r.ongoing for r in pool.replicas if r.stopped_s is None)
            pool.ongoing.append((now, ongoing))
            while pool.ongoing and pool.ongoing[0][0] < now - self.serve.look_back_period_s:
                pool.ongoing.popleft()
            current = len(pool.live)
            if self.autoscaler == "fixed":
                self.scale(pool, pool.fixed, now, "fixed")
            elif self.autoscaler.startswith("slo"):
                queued = len(pool.queue) + sum(len(r.waiting) for r in pool.live)
                win = Window(span_s=max(self.tick_s, min(self.settings.window_s, now)),
                             arrivals_s=[t - now for t, _, _ in pool.window],
                             prompt_tokens=[n for _, n, _ in pool.window],
                             output_tokens=[m for _, _, m in pool.window], queued=queued)
                d = decide(now, current, win, pool.profile, self.slo, self.settings, pool.state)
                pool.state = d.state
                views.append(PoolView(name=pool.name, profile=pool.profile, slo=self.slo, settings=self.settings,
                                      current=current, context_tokens=pool.profile.kv_capacity_tokens,
                                      price_per_replica_hour=pool.price_per_replica_hour, window=win, decision=d))
            else:
                self.serve_default(pool, current, now)
        if views:
            placed = place_growth(views) if self.autoscaler == "slo-cheapest" else {v.name: v.decision for v in views}
            for pool in self.pools:
                self.scale(pool, placed[pool.name].desired, now, placed[pool.name].reason)
        self.samples.append((now, sum(len(p.live) for p in self.pools)))

    def serve_default(self, pool: _Pool, current: int, now: float) -> None:
        """Serve's ``replica_queue_length_autoscaling_policy`` with its delay logic (timestamps, not counters)."""
        avg = sum(n for _, n in pool.ongoing) / len(pool.ongoing)
        lo, hi = self.settings.min_replicas, self.settings.max_replicas
        want = min(hi, max(lo, math.ceil(avg / self.serve.target_ongoing_requests)))
        if current == 0 and (pool.queue or avg > 0):
            want = max(want, 1)
        direction = (want > current) - (want < current)
        if direction == 0:
            pool.serve_since, pool.serve_dir = None, 0
            return
        if direction != pool.serve_dir:
            pool.serve_since, pool.serve_dir = now, direction
        delay = self.serve.upscale_delay_s if direction > 0 else self.serve.downscale_delay_s
        if current == 0 or now - pool.serve_since >= delay:
            self.scale(pool, want, now, f"ongoing {avg:.1f} over {self.serve.look_back_period_s:.0f}s / target "
                                        f"{self.serve.target_ongoing_requests:g} → {want}")
            pool.serve_since, pool.serve_dir = None, 0

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> None:
        for r in requests:
            self.push(r.arrival_s, "arrival", r)
        self.push(0.0, "tick", None)
        pending = len(requests)
        while self.events:
            now, _, kind, obj = heapq.heappop(self.events)
            if kind == "arrival":
                self.arrive(obj, now)
            elif kind == "done":
                rep, epoch = obj
                if epoch == rep.epoch:
                    self.finish(rep, now)
            elif kind == "ready":
                if obj.stopped_s is None:
                    obj.ready = True
                    self.drain_queue(obj.pool, now)
            elif len(self.done) + self.rejected < pending:  # tick, while there is work
                self.control(now)
                self.push(now + self.tick_s, "tick", None)
        end = max((r.end_s for r in self.done), default=0.0)
        for pool in self.pools:
            for rep in pool.replicas:
                if rep.stopped_s is None or rep.stopped_s > end:
                    rep.stopped_s = max(end, rep.started_s)


def _summary(cluster: _Cluster, autoscaler: str, slo: SLOTarget, devices: dict[str, int],
             total: int) -> AutoscaleResult:
    done = cluster.done
    ttft = [r.first_token_s - r.spec.arrival_s for r in done]
    tpot = [(r.end_s - r.first_token_s) / (r.spec.output_tokens - 1) for r in done if r.spec.output_tokens > 1]
    met = sum(1 for r, t in zip(done, ttft) if t <= slo.ttft_s and (
        r.spec.output_tokens == 1 or (r.end_s - r.first_token_s) / (r.spec.output_tokens - 1) <= slo.tpot_s))
    start = min((r.spec.arrival_s for r in done), default=0.0)
    span = max((r.end_s for r in done), default=0.0) - start
    hours, dev_hours, cost, priced = 0.0, 0.0, 0.0, True
    for pool in cluster.pools:
        h = sum(r.stopped_s - r.started_s for r in pool.replicas) / 3600
        hours += h
        dev_hours += h * devices[pool.name]
        if pool.price_per_replica_hour is None:
            priced = False
        else:
            cost += h * pool.price_per_replica_hour
    counts = [n for _, n in cluster.samples] or [0]
    return AutoscaleResult(
        autoscaler=autoscaler, completed=len(done), rejected=cluster.rejected,
        slo_attainment=met / total if total else 0.0, goodput_rps=met / span if span > 0 else 0.0,
        ttft_s=_percentiles(ttft), tpot_s=_percentiles(tpot), replica_hours=hours, device_hours=dev_hours,
        cost_usd=cost if priced else None, peak_replicas=max(counts), mean_replicas=sum(counts) / len(counts),
        span_s=span, events=cluster.log)


def run_autoscaler(shape: ModelShape, pools: list[Pool], requests: list[Request], autoscaler: str,
                   slo: SLOTarget = SLOTarget(), settings: AutoscaleSettings = AutoscaleSettings(),
                   serve: ServeDefault = ServeDefault(), tick_s: float = 1.0, max_ongoing_requests: int = 64,
                   initial_replicas: int | None = None,
                   profiles: list[ReplicaProfile] | None = None) -> AutoscaleResult:
    """Replay ``requests`` with one autoscaler. ``fixed`` serves with each pool's ``replicas`` throughout; the
    autoscalers start with ``initial_replicas`` serving (default: the pool's ``replicas``; clipped to
    [min_replicas, max_replicas]) and move within those bounds.
    A replica takes at most ``max_ongoing_requests`` (Serve's option of that name); the rest wait in the pool's
    queue."""
    if autoscaler not in AUTOSCALERS:
        raise ValueError(f"unknown autoscaler {autoscaler!r}: use {list(AUTOSCALERS)}")
    profiles = profiles or [replica_profile(shape, p) for p in pools]
    sim_pools = []
    for i, (pool, prof) in enumerate(zip(pools, profiles)):
        price = pool.hardware.price_per_hour
        sim_pools.append(_Pool(f"{pool.hardware.name}:{pool.devices}#{i}", prof,
                               None if price is None else price * pool.devices, pool.replicas))
    cluster = _Cluster(sim_pools, autoscaler, slo, settings, serve, tick_s, max_ongoing_requests)
    for pool in sim_pools:
        first = pool.fixed if initial_replicas is None else initial_replicas
        initial = pool.fixed if autoscaler == "fixed" else min(settings.max_replicas, max(settings.min_replicas, first))
        for _ in range(initial):
            cluster.add_replica(pool, 0.0, ready_now=True)
    cluster.run(sorted(requests, key=lambda r: r.arrival_s))
    return _summary(cluster, autoscaler, slo, {p.name: p.profile.devices for p in sim_pools}, len(requests))


def compare_autoscalers(shape: ModelShape, pools: list[Pool], requests: list[Request],
                        autoscalers: tuple[str, ...] = AUTOSCALERS, **kw) -> list[AutoscaleResult]:
    """Each autoscaler over the same trace and cluster (the pools' profiles built once)."""
    profiles = [replica_profile(shape, p) for p in pools]
    return [run_autoscaler(shape, pools, requests, a, profiles=profiles, **kw) for a in autoscalers]
