"""Cluster simulator: replay a workload through the cost model, per policy, with iteration-level batching.

Each replica runs the loop a continuous-batching engine runs: if waiting requests fit (token budget, KV capacity),
one pure-prefill iteration over them with the policy's strategy; otherwise one megatron decode step for all running
sequences. A router sends each arrival to the replica with the least predicted time to its first token. Policies
differ only in the prefill strategy and in the memory their strategies keep resident (replicas and gather buffers
shrink the KV cache), so side-by-side numbers isolate what dynamic partitioning buys. These are predictions.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from cost.formulas import Work
from cost.hardware import Hardware
from cost.layouts import model_time, resident_bytes, workspace_bytes
from cost.planner import DEFAULT_UTILIZATION, decode_step_time, executable_layouts, memory_row, plan_prefill
from cost.report import default_lengths, plan
from cost.search import STRATEGIES
from cost.workloads import Request
from strategies.layout import check_devices, parse_layout
from strategies.shapes import ModelShape

# ``dynamic`` picks among the three named strategies, ``dynamic:front`` among every layout of the executable front
POLICIES = ("static:megatron", "static:weight_gathered", "static:projection_replicated", "dynamic", "dynamic:front")
LENGTH_BUCKETS = (128, 256, 512, 1024, 2048, 4096)
REPLICA_SHARE = 0.6  # of the memory the Megatron shards leave, what a dynamic policy's replicas may take


class Pool(BaseModel):
    """``replicas`` engine replicas of ``devices`` devices of one hardware type."""

    hardware: Hardware
    devices: int
    replicas: int = 1


class SLO(BaseModel):
    ttft_s: float = 1.0
    tpot_s: float = 0.1


class Percentiles(BaseModel):
    p50: float
    p90: float
    p99: float


class BucketStats(BaseModel):
    prompt_up_to: int
    requests: int
    ttft_p50_s: float
    e2e_p50_s: float


class RequestResult(BaseModel):
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    e2e_s: float
    strategy: str
    replica: str


class PolicyResult(BaseModel):
    policy: str
    runnable: bool
    reason: str = ""
    completed: int = 0
    rejected: int = 0
    ttft_s: Percentiles | None = None
    tpot_s: Percentiles | None = None
    e2e_s: Percentiles | None = None
    slo_attainment: float = 0.0
    goodput_rps: float = 0.0
    strategies: dict[str, int] = {}  # prefill iterations per strategy
    kv_capacity_tokens: dict[str, int] = {}  # per replica
    by_length: list[BucketStats] = []
    records: list[RequestResult] = []


class SimulationReport(BaseModel):
    model: str
    pools: list[str]
    requests: int
    slo: SLO
    policies: list[PolicyResult]


@dataclass
class _Req:
    spec: Request
    generated: int = 0
    first_token_s: float = 0.0
    strategy: str = ""
    predicted_prefill_s: float = 0.0

    @property
    def kv_reserve(self) -> int:  # reserved at admission so a sequence is never preempted
        return self.spec.prompt_tokens + self.spec.output_tokens


def take_prefill_batch(waiting: deque, seats: int, max_batched_tokens: int, kv_free: int,
                       kv: Callable[[Any], int]) -> list:
    """Pop the next prefill batch off ``waiting`` as an engine admits one: in order, at most ``seats`` sequences and
    ``max_batched_tokens`` prompt tokens (a longer prompt goes alone), each reserving ``kv(r)`` of ``kv_free``."""
    batch, tokens = [], 0
    while waiting and len(batch) < seats:
        r = waiting[0]
        if batch and tokens + r.spec.prompt_tokens > max_batched_tokens:
            break
        if kv(r) > kv_free:
            break
        waiting.popleft()
        batch.append(r)
        tokens += r.spec.prompt_tokens
        kv_free -= kv(r)
    return batch


@dataclass
class _Replica:
    name: str
    shape: ModelShape
    hw: Hardware
    p: int
    strategies: tuple[str, ...]  # prefill strategies this replica may use under the policy
    kv_capacity: int
    max_batched_tokens: int
    max_seqs: int
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    kv_used: int = 0
    busy_until: float = 0.0
    busy: bool = False

    def prefill_choice(self, lengths: list[int]) -> tuple[str, float]:
        if len(self.strategies) == 1:
            name = self.strategies[0]
            padded = check_devices(self.shape, self.p).padded_shape(self.shape)
            return name, model_time(parse_layout(name), padded, self.hw, self.p, Work.prefill(lengths))
        ch = plan_prefill(self.shape, self.hw, self.p, lengths, available=self.strategies)
        return ch.strategy, ch.time_s

    def backlog(self, now: float) -> float:
        return max(0.0, self.busy_until - now) + sum(r.predicted_prefill_s for r in self.waiting)

    def next_iteration(self) -> tuple[float, str, list[_Req]] | None:
        """(duration, strategy or 'decode', requests) of the next iteration, admitting a prefill batch if one fits."""
        batch = take_prefill_batch(self.waiting, self.max_seqs - len(self.running), self.max_batched_tokens,
                                   self.kv_capacity - self.kv_used, lambda r: r.kv_reserve)
        self.kv_used += sum(r.kv_reserve for r in batch)
        if batch:
            name, t = self.prefill_choice([r.spec.prompt_tokens for r in batch])
            return t, name, batch
        if self.running:
            ctx = [r.spec.prompt_tokens + r.generated for r in self.running]
            return decode_step_time(self.shape, self.hw, self.p, ctx), "decode", self.running
        return None


def _replicas(shape: ModelShape, pools: list[Pool], policy: str, max_batched_tokens: int, max_seqs: int,
              utilization: float, replica_share: float = REPLICA_SHARE) -> list[_Replica]:
    """Build each pool's replicas for a policy; ValueError when a static policy's strategy cannot run there."""
    out = []
    for pool in pools:
        hw, p = pool.hardware, pool.devices
        padded = check_devices(shape, p).padded_shape(shape)
        b = hw.bytes_per_element
        longest = Work.prefill(shape.max_position_embeddings)
        offered = executable_layouts(shape, hw, p) if policy == "dynamic:front" else list(STRATEGIES)
        fits = [n for n in offered if memory_row(n, shape, hw, p, longest, utilization).feasible]
        work = Work.prefill(max_batched_tokens)

        def weights_and_workspace(names) -> tuple[float, float]:  # these layouts held together; largest workspace
            layouts = [parse_layout(n) for n in (*names, "megatron")]
            return (resident_bytes(layouts, padded, p, b),
                    max(workspace_bytes(x, padded, p, work, b) for x in layouts))

        def held(names) -> float:
            return sum(weights_and_workspace(names))

        if policy.startswith("dynamic"):  # keep resident only what the planner would ever pick (buffers cost KV room)
            top = max(max_batched_tokens, shape.max_position_embeddings)
            rows = plan(shape, hw, p, lengths=default_lengths(shape) + [top], available=fits,
                        utilization=utilization).lengths
            names: tuple[str, ...] = ("megatron",)
            base = held(names)
            # Replicas and buffers may take at most ``replica_share`` of what the Megatron shards leave, the rest
            # stays KV cache (an engine pool's replica_budget_gb): one sequence fitting is not enough under load.
            room = base + replica_share * (hw.memory_gb * 1e9 * utilization - base)
            for n in dict.fromkeys(r.choice for r in rows):  # by length, while they fit together
                if n not in names and held((*names, n)) <= room:
                    names += (n,)
        else:
            names = (policy.removeprefix("static:"),)
        if not set(names) <= set(fits) or not names:
            raise ValueError(f"{names[0] if names else 'no strategy'} does not fit {shape.name} on {p}×{hw.name} "
                             f"with room for one {longest.tokens}-token sequence")
        resident, ws = weights_and_workspace(names)
        kv = int((hw.memory_gb * 1e9 * utilization - resident - ws) / (padded.kv_bytes_per_token(b) / p))
        for i in range(pool.replicas):
            out.append(_Replica(f"{p}x{hw.name}#{i}", shape, hw, p, names, kv, max_batched_tokens, max_seqs))
    return out


def _percentiles(xs: list[float]) -> Percentiles | None:
    if not xs:
        return None
    s = sorted(xs)

    def q(f: float) -> float:
        return s[min(len(s) - 1, int(f * len(s)))]

    return Percentiles(p50=q(0.5), p90=q(0.9), p99=q(0.99))


def run_policy(shape: ModelShape, pools: list[Pool], requests: list[Request], policy: str, slo: SLO = SLO(),
               max_batched_tokens: int = 4096, max_seqs: int = 256,
               utilization: float = DEFAULT_UTILIZATION, replica_share: float = REPLICA_SHARE) -> PolicyResult:
    """Replay ``requests`` under one policy; event-driven over arrivals and iteration completions."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: use {list(POLICIES)}")
    try:
        reps = _replicas(shape, pools, policy, max_batched_tokens, max_seqs, utilization, replica_share)
    except ValueError as e:
        return PolicyResult(policy=policy, runnable=False, reason=str(e))
    seq = itertools.count()
    events: list = [(r.arrival_s, next(seq), "arrival", r) for r in requests]
    heapq.heapify(events)
    done: list[tuple[_Req, float, str]] = []
    rejected, counts = 0, Counter()

    def start(rep: _Replica, now: float) -> None:
        it = rep.next_iteration()
        if it is None:
            rep.busy = False
            return
        dur, kind, reqs = it
        rep.busy, rep.busy_until = True, now + dur
        heapq.heappush(events, (now + dur, next(seq), "done", (rep, kind, list(reqs))))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrival":
            req = _Req(payload)
            ok = [r for r in reps if req.kv_reserve <= min(r.kv_capacity, shape.max_position_embeddings)]
            if not ok:
                rejected += 1
                continue
            rep = min(ok, key=lambda r: (r.backlog(now) + r.prefill_choice([payload.prompt_tokens])[1],
                                         len(r.running)))
            req.predicted_prefill_s = rep.prefill_choice([payload.prompt_tokens])[1]
            rep.waiting.append(req)
            if not rep.busy:
                start(rep, now)
            continue
        rep, what, reqs = payload
        if what == "decode":
            for r in reqs:
                r.generated += 1
        else:
            counts[what] += 1
            for r in reqs:
                r.generated, r.first_token_s, r.strategy = 1, now, what
            rep.running.extend(reqs)
        for r in [r for r in rep.running if r.generated >= r.spec.output_tokens]:
            rep.running.remove(r)
            rep.kv_used -= r.kv_reserve
            done.append((r, now, rep.name))
        start(rep, now)
    return _summarise(policy, done, rejected, counts, reps, slo)


def _summarise(policy: str, done: list, rejected: int, counts: Counter, reps: list[_Replica],
               slo: SLO) -> PolicyResult:
    records = [RequestResult(prompt_tokens=r.spec.prompt_tokens, output_tokens=r.spec.output_tokens,
                             ttft_s=r.first_token_s - r.spec.arrival_s, e2e_s=end - r.spec.arrival_s,
                             strategy=r.strategy, replica=name) for r, end, name in done]
    tpot = [(rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1) for rec in records if rec.output_tokens > 1]
    met = sum(1 for rec in records if rec.ttft_s <= slo.ttft_s
              and (rec.output_tokens == 1 or (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1) <= slo.tpot_s))
    span = (max(end for _, end, _ in done) - min(r.spec.arrival_s for r, _, _ in done)) if done else 0.0
    buckets, lo = [], 0
    for hi in (*LENGTH_BUCKETS, 10**9):
        sel = [rec for rec in records if lo < rec.prompt_tokens <= hi]
        if sel:
            buckets.append(BucketStats(prompt_up_to=hi, requests=len(sel),
                                       ttft_p50_s=_percentiles([x.ttft_s for x in sel]).p50,
                                       e2e_p50_s=_percentiles([x.e2e_s for x in sel]).p50))
        lo = hi
    total = len(records) + rejected
    return PolicyResult(policy=policy, runnable=True, completed=len(records), rejected=rejected,
                        ttft_s=_percentiles([x.ttft_s for x in records]), tpot_s=_percentiles(tpot),
                        e2e_s=_percentiles([x.e2e_s for x in records]),
                        slo_attainment=met / total if total else 0.0, goodput_rps=met / span if span > 0 else 0.0,
                        strategies=dict(counts), kv_capacity_tokens={r.name: r.kv_capacity for r in reps},
                        by_length=buckets, records=records)


def simulate(shape: ModelShape, pools: list[Pool], requests: list[Request], policies: tuple[str, ...] = POLICIES,
             slo: SLO = SLO(), **engine) -> SimulationReport:
    """Every policy over the same requests and cluster, side by side."""
    if not pools:
        raise ValueError("simulate needs at least one pool")
    return SimulationReport(model=shape.name, pools=[f"{p.hardware.name}:{p.devices}:{p.replicas}" for p in pools],
                            requests=len(requests), slo=slo,
                            policies=[run_policy(shape, pools, requests, pol, slo, **engine) for pol in policies])
