"""Chaos under load: a fault injected while 16 streams run, and an account of how every request ended.

A stream (OpenAI SSE through Serve's HTTP proxy) ends in one of these ways:

* ``finished``: its finish reason, then ``[DONE]`` (``retried`` counts those the ingress started again elsewhere
  because their replica failed before their first token: ``x-dynpart-retries``);
* ``error event``: OpenAI's error body as an in-band ``data:`` event, then ``[DONE]`` (tokens had been sent);
* ``error status``: a 4xx/5xx answer with OpenAI's error body, before any token;
* ``connection error``: the connection broke mid-body (an incomplete chunked body: the client's HTTP library raises);
* ``left``: the client itself went away (the disconnect fault);
* ``cut``: the body ended cleanly with neither a finish reason nor an error: **silent, must never happen**;
* ``hung``: still open at the deadline: **must never happen**.

``python -m load_tests.chaos`` deploys the shipped config (two ingress replicas, the two-device pool's replicas
raised to two) on SmolLM2, runs every fault in turn and prints RELIABILITY.md's table; ``tests/test_chaos.py`` runs
the same faults on a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

STREAMS = 16
OUTCOMES = ("finished", "error event", "error status", "connection error", "left", "cut", "hung")


@dataclass
class Ended:
    """How one request ended."""

    outcome: str
    retries: int = 0
    tokens: int = 0
    after_fault_s: float | None = None  # when it ended, from the fault (None: before the fault)
    message: str = ""  # the error's message, if it ended with one


@dataclass
class Report:
    """One fault under load: how the requests ended, and how the service came back."""

    fault: str
    ended: list[Ended]
    first_error_s: float | None  # from the fault to the first request that ended with an error (detection)
    served_again_s: float | None  # from the fault to the first new request answered 200 (None: not within the limit)
    blocks_after: int = -1  # KV blocks held by sequences once the load ended (every live replica): must be 0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    during: Counter = field(default_factory=Counter)  # statuses of the small requests sent while the fault ran

    @property
    def counts(self) -> Counter:
        return Counter(e.outcome for e in self.ended)

    @property
    def retried(self) -> int:
        return sum(1 for e in self.ended if e.retries and e.outcome == "finished")

    def row(self) -> str:
        c = self.counts
        s = lambda x: "—" if x is None else f"{x:.1f}"  # noqa: E731
        return (f"| {self.fault} | {len(self.ended)} | {c['finished']} | {self.retried} | {c['error event']} | "
                f"{c['error status']} | {c['connection error']} | {c['left']} | {c['cut']} | {c['hung']} | "
                f"{s(self.first_error_s)} | {s(self.served_again_s)} | {self.blocks_after} | "
                f"{self.rss_before_mb:.0f} → {self.rss_after_mb:.0f} | "
                f"{', '.join(f'{n}× {k}' for k, n in self.during.items()) or '—'} |")


TABLE_HEAD = ("| fault | requests | finished | of which retried | error event | error status | connection error | "
              "left | cut | hung | first error (s) | served again (s) | KV blocks after | RSS MB before → after | "
              "requests sent meanwhile |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


async def one_stream(client: httpx.AsyncClient, path: str, body: dict, headers: dict, started: list[float],
                     fault_at: list[float], deadline_s: float, leave_after: int | None = None) -> Ended:
    """Run one streamed request to its end and classify how it ended. ``started`` collects the arrival of first
    tokens (the driver injects the fault once enough have one); ``leave_after``: disconnect after that many events."""
    since = lambda: None if not fault_at else time.monotonic() - fault_at[0]  # noqa: E731
    tokens, finished, errored, message = 0, False, False, ""

    async def read() -> Ended:
        nonlocal tokens, finished, errored, message
        async with client.stream("POST", path, json=body, headers=headers) as r:
            retries = int(r.headers.get("x-dynpart-retries", 0))
            if r.status_code != 200:  # an error status is explicit, whatever the body (Serve's proxy sends text)
                text = (await r.aread()).decode(errors="replace")
                return Ended("error status", retries, 0, since(), f"{r.status_code}: {text[:300]}")
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    kind = "finished" if finished else "error event" if errored else "cut"
                    return Ended(kind, retries, tokens, since(), message)
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    errored, message = True, event["error"]["message"]
                    continue
                choice = event["choices"][0]
                if choice.get("text") or choice.get("delta", {}).get("content"):
                    tokens += 1
                    if tokens == 1:
                        started.append(time.monotonic())
                finished = finished or choice.get("finish_reason") is not None
                events += 1
                if leave_after is not None and events >= leave_after:
                    return Ended("left", retries, tokens, since())
            return Ended("cut", retries, tokens, since())  # the body ended without [DONE]

    try:
        async with asyncio.timeout(deadline_s):
            return await read()
    except TimeoutError:
        return Ended("hung", 0, tokens, since())
    except httpx.HTTPError as e:
        return Ended("connection error", 0, tokens, since(), f"{type(e).__name__}: {e}")


async def served_again(client: httpx.AsyncClient, path: str, body: dict, headers: dict, limit_s: float,
                       t0: float) -> float | None:
    """Seconds from ``t0`` until a new small request is answered 200 (polling), or None past ``limit_s``."""
    while time.monotonic() - t0 < limit_s:
        try:
            r = await client.post(path, json={**body, "stream": False, "max_tokens": 2}, headers=headers, timeout=30)
            if r.status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    return None


async def probing(client: httpx.AsyncClient, path: str, body: dict, headers: dict, statuses: Counter,
                  stop: asyncio.Event) -> None:
    """Small non-streamed requests one after another until ``stop``; each answer's status (or ``connection
    error``) counted."""
    while not stop.is_set():
        try:
            r = await client.post(path, json={**body, "stream": False, "max_tokens": 2}, headers=headers)
            statuses[r.status_code] += 1
        except httpx.HTTPError:
            statuses["connection error"] += 1
        await asyncio.sleep(0.1)


async def under_load(base: str, fault: Callable[[], object], name: str, body: dict, headers: dict | None = None,
                     streams: int = STREAMS, fault_when_started: int = 4, deadline_s: float = 120,
                     leave: int = 0, recover_limit_s: float = 120, probe: bool = False) -> Report:
    """``streams`` streams of ``body`` at once; once ``fault_when_started`` of them have their first token,
    ``fault()`` runs (in a thread: it may block); the first ``leave`` streams disconnect after a few events.
    ``probe``: small requests are sent one after another while the fault runs (``Report.during``)."""
    headers = headers or {}
    started: list[float] = []
    fault_at: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(deadline_s, connect=10)) as client:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        tasks = [asyncio.create_task(one_stream(client, path, {**body, "stream": True}, headers, started, fault_at,
                                                deadline_s, leave_after=3 if i < leave else None))
                 for i in range(streams)]
        while len(started) < fault_when_started and not all(t.done() for t in tasks):
            await asyncio.sleep(0.02)
        fault_at.append(time.monotonic())
        during, stop = Counter(), asyncio.Event()
        prober = asyncio.create_task(probing(client, path, body, headers, during, stop)) if probe else None
        again = asyncio.create_task(served_again(client, path, body, headers, recover_limit_s, fault_at[0]))
        await asyncio.to_thread(fault)
        stop.set()
        if prober is not None:
            await prober
        ended = list(await asyncio.gather(*tasks))
        errors = [e.after_fault_s for e in ended if e.outcome in ("error event", "error status", "connection error")
                  and e.after_fault_s is not None]
        again = await again
    return Report(name, ended, min(errors) if errors else None, again, during=during)


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes (those still alive)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024


def replica_infos(app: str, deployment: str, replicas: int, tries: int = 60) -> list[dict]:
    """``info()`` of each of a deployment's ``replicas`` running replicas (Serve routes each call to one: ask until
    every replica answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        info = handle.info.remote().result(timeout_s=30)
        seen[info["replica"]] = info
        if len(seen) >= replicas:
            break
    return list(seen.values())


def ingress_pids(app: str) -> list[int]:
    """The pids of the app's ingress replicas on this machine (Ray titles each replica's process
    ``ray::ServeReplica:<app>:<deployment>``)."""
    title = f"ServeReplica:{app}:Ingress".encode()
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if entry.isdigit() and title in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return sorted(pids)


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    os.kill(pid, sig)


# -- the command: the shipped config on SmolLM2 --------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="serve_config.yaml")
    ap.add_argument("--pool", default="long", help="the pool whose replicas the faults hit (needs >= 2 devices)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--watchdog-floor", type=float, default=5.0, help="step_watchdog_floor_s of the hit pool")
    ap.add_argument("--num-cpus", type=int, default=6, help="CPUs Ray may hand out (at least this machine's)")
    ap.add_argument("--graceful-shutdown", type=float, default=60.0,
                    help="graceful_shutdown_s: how long a replaced replica may finish its requests (the redeploy)")
    ap.add_argument("--faults", default="replica-faults,hung-pool",
                    help="replica-faults (a worker killed or stopped, a replica or an ingress killed, clients leaving, "
                         "a redeploy; each on one replica of --pool) and/or hung-pool (every replica of --pool hung "
                         "while the other pool serves)")
    ap.add_argument("--burst", type=int, default=56,
                    help="requests sent to the hung pool as it hangs: more than its replicas take (2 x 24 as shipped)")
    args = ap.parse_args()
    import yaml
    from ray import serve

    from app.serve.app import build_app
    from app.serve.config import AppConfig

    spec = yaml.safe_load(open(args.config))["applications"][0]
    cfg = AppConfig.model_validate(spec["args"])
    cfg.ingress_replicas, cfg.graceful_shutdown_s = 2, args.graceful_shutdown
    for p in cfg.pools:
        if p.name == args.pool:
            p.num_replicas, p.step_watchdog_floor_s, p.health_check_period_s = 2, args.watchdog_floor, 2
            p.autoscaling = p.slo = None  # two replicas throughout: the faults are measured here, not the scaling
    import ray

    # Two replicas of the hit pool and two ingresses ask Ray for more cores than a small machine has: declare enough
    # (the processes share the real cores; the faults, not the speed, are measured here).
    ray.init(num_cpus=max(args.num_cpus, os.cpu_count() or 1))
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    app, route = "chaos", "/chaos"
    serve.run(build_app(cfg.model_dump()), name=app, route_prefix=route)
    base = f"http://127.0.0.1:8000{route}"
    body = {"model": cfg.model_name, "prompt": "Tell me a story about a lighthouse keeper.",
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    changed = {**cfg.model_dump(), "max_tokens_limit": cfg.max_tokens_limit - 1}  # every replica is replaced
    redeploy = lambda: serve.run(build_app(changed), name=app, route_prefix=route)  # noqa: E731
    faults = args.faults.split(",")
    reports = []
    if "replica-faults" in faults:
        reports = asyncio.run(run_faults(base, app, args.pool, 2, body, {"x-dynpart-pool": args.pool}, redeploy))
    if "hung-pool" in faults:  # every replica of the hit pool hung while the others take the streams
        others = [p.name for p in cfg.pools if p.name != args.pool]
        infos = whole_again(app, args.pool, 2)
        workers = [pid for info in infos for pid in info["pids"][1:]]
        hung: list[HungPool] = []
        report = asyncio.run(under_load(
            base, lambda: hung.append(hang_pool(base, workers, body, args.pool, burst=args.burst)),
            f"SIGSTOP every shard worker of pool {args.pool} (streams and probes on {others[0]})", body,
            {"x-dynpart-pool": others[0]}, fault_when_started=8, probe=True))
        report.blocks_after = sum(i["seqs_in_use"] for i in whole_again(app, args.pool, 2))
        reports.append(report)
        print(hung[0].row())
    print(TABLE_HEAD)
    for r in reports:
        print(r.row())
    serve.delete(app)


@dataclass
class HungPool:
    """One pool hung (every shard worker of every replica SIGSTOPped) while the others serve: what a client saw."""

    burst: Counter = field(default_factory=Counter)  # statuses of the requests sent to the pool as it hung
    failed_s: float | None = None  # from the hang to the first of them answered with an error (the step watchdog)
    served_again_s: float | None = None  # from the hang to the first new 200 from the pool (replaced by Serve)
    health: Counter = field(default_factory=Counter)  # /health's status field while the pool was down
    slowest_health_s: float = 0.0

    def row(self) -> str:
        s = lambda x: "—" if x is None else f"{x:.1f}"  # noqa: E731
        return (f"hung pool: its requests {dict(self.burst)}, first error after {s(self.failed_s)} s, serving again "
                f"after {s(self.served_again_s)} s; /health {dict(self.health)}, slowest "
                f"{self.slowest_health_s * 1e3:.0f} ms")


def hang_pool(base: str, pids: list[int], body: dict, pool: str, burst: int, limit_s: float = 180) -> HungPool:
    """SIGSTOP ``pids`` (every shard worker of ``pool``) and send ``pool`` ``burst`` small requests at once (pinned
    by ``x-dynpart-pool``; more than its replicas take, so some wait in the ingress's request router when the step
    watchdog fails the replica); then, reading ``/health`` in between, ask ``pool`` until it answers 200 again
    (Serve replaced the replica). The stopped processes are continued at the end (the replacement normally killed
    them already)."""
    out, t0 = HungPool(), time.monotonic()
    small = {**body, "stream": False, "max_tokens": 2}
    pinned = {"x-dynpart-pool": pool}

    async def one(client: httpx.AsyncClient) -> None:
        try:
            r = await client.post("/v1/completions", json=small, headers=pinned)
            status = r.status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        out.burst[status] += 1
        if status != 200 and out.failed_s is None:
            out.failed_s = time.monotonic() - t0

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(limit_s, connect=10)) as client:
            sent = asyncio.gather(*(one(client) for _ in range(burst)))
            while time.monotonic() - t0 < limit_s:
                await asyncio.sleep(0.5)
                h0 = time.monotonic()
                health = await client.get("/health", timeout=10)
                out.slowest_health_s = max(out.slowest_health_s, time.monotonic() - h0)
                out.health[health.json()["status"]] += 1
                if out.failed_s is None:
                    continue
                r = await client.post("/v1/completions", json=small, headers=pinned)
                if r.status_code == 200:
                    out.served_again_s = time.monotonic() - t0
                    break
            await sent

    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        asyncio.run(run())
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    return out


def engine_pids(infos: list[dict]) -> list[int]:
    return [pid for info in infos for pid in info["pids"]]


async def run_faults(base: str, app: str, pool: str, replicas: int, body: dict, headers: dict,
                     redeploy: Callable[[], object] | None = None) -> list[Report]:
    """Every fault in turn on a pool of ``replicas`` replicas of two or more devices, waiting between faults for
    the pool to be whole again; ``redeploy`` (last): deploys a changed config while the streams run."""
    reports = []

    async def measured(name: str, fault: Callable[[list[dict]], object], leave: int = 0, probe: bool = False) -> Report:
        infos = await asyncio.to_thread(whole_again, app, pool, replicas)
        before = rss_mb(engine_pids(infos))
        report = await under_load(base, lambda: fault(infos), name, body, headers, leave=leave, probe=probe,
                                  fault_when_started=8)
        after = await asyncio.to_thread(whole_again, app, pool, replicas)
        report.rss_before_mb, report.rss_after_mb = before, rss_mb(engine_pids(after))
        report.blocks_after = sum(i["seqs_in_use"] for i in after)
        reports.append(report)
        print(report.row(), flush=True)
        return report

    await measured("SIGKILL a shard worker", lambda infos: kill(infos[0]["pids"][-1]))
    await measured("SIGSTOP a shard worker", lambda infos: kill(infos[0]["pids"][-1], signal.SIGSTOP))
    await measured("kill an engine replica (actor)", lambda infos: kill(infos[0]["pids"][0]))
    await measured("kill an ingress replica", lambda infos: kill(ingress_pids(app)[0]))
    await measured("clients disconnect mid-stream", lambda infos: None, leave=4)
    if redeploy is not None:
        await measured("redeploy a changed config", lambda infos: redeploy(), probe=True)
    return reports


def whole_again(app: str, pool: str, replicas: int, limit_s: float = 180) -> list[dict]:
    """The pool's replicas' infos once ``replicas`` healthy ones run and hold no sequence."""
    t0 = time.monotonic()
    while True:
        infos = replica_infos(app, pool, replicas, tries=20)
        if len(infos) >= replicas and all(i["healthy"] and i["seqs_in_use"] == 0 for i in infos):
            return infos
        if time.monotonic() - t0 > limit_s:
            raise TimeoutError(f"pool {pool} not whole again after {limit_s:.0f} s: {infos}")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
