"""Pool load that every ingress replica sees alike: engine replicas report it, ingresses read it.

Admission control needs each pool's expected wait, and with several ingress replicas no single one has seen every
request. So each engine replica reports its ``EngineLoad`` (what is running and waiting, its measured decode step
time, the wait a new request would have there) to one ``LoadBoard`` a few times a second (an idle replica, whose load
does not change, once a ``HEARTBEAT_S``: every report is a Serve call the board pays for), and every ingress reads the
board on the same beat. Between two reads an ingress also counts what it sent itself (``Dispatcher``), so a burst that
arrives within one beat is not all admitted against a stale figure. A replica Serve stops (scaled down, redeployed)
takes its report off the board as it goes (``withdraw``); one that dies silently is dropped ``STALE_S`` after its last.

The board also watches the app's replicas: a replica that Serve cannot place (a scale-up beyond the cluster's free
cores or GPUs) is logged with what it waits for and counted in ``dynpart_replicas{serve_deployment,state}``, instead of
pending silently; and ``view()`` tells ingresses which deployments have lost every replica they had running (a node
lost), so they route around that pool instead of queueing for a replica that is not coming soon. (A deployment that
has not started yet is not down: requests wait for it, as Serve makes them.) Nor is a deployment its autoscaler took
to zero replicas: it is ``idle`` (Serve reports it HEALTHY, its target of zero met, or UPSCALING while one starts; a
replica that died makes it UNHEALTHY until replaced), and a request sent to it makes Serve start one. Each start from
zero is timed, from the first read that sees a replica starting to the first that sees it running (``cold_start_s``,
to within ``WATCH_S``), for admission and ``/health``.

Shutting down (``dynpart serve``'s Ctrl-C): ``drain()`` tells every ingress, on its next read, to take no new request
(503, retry elsewhere) while the ones in flight finish; the board's reports say when the engines are idle.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dataclasses import dataclass, field

from ray import serve

from app.engine.messages import EngineLoad
from app.serve.serve_status import app_states

REPORT_S = 0.25  # how often replicas look at their load (and report it if it changed) and ingresses read
HEARTBEAT_S = 1.0  # a replica whose load has not changed reports it again this often (so the board keeps it)
STALE_S = 5.0  # a replica silent this long is gone (replaced, scaled down): its report is dropped
DECODE_ROLE = ":decode"  # a disaggregated pool's decode replicas report as "<pool>:decode"
WATCH_S = 2.0  # how often the board reads the app's replica states
PENDING_WARN_S = 30.0  # a replica still starting after this long is waiting for resources: say so

logger = logging.getLogger("ray.serve")


@dataclass
class BoardState:
    """What an ingress reads from the board each beat, in one call."""

    loads: dict[str, list[EngineLoad]]  # every live replica's latest load, by pool (``snapshot()``)
    lost: list[str] = field(default_factory=list)  # deployments that ran and have no running replica, not by choice
    idle: list[str] = field(default_factory=list)  # deployments at zero replicas by their autoscaler's choice
    cold_start_s: dict[str, float] = field(default_factory=dict)  # the last measured start from zero, by deployment
    draining: bool = False  # the app is shutting down: ingresses take no new requests
    board_id: str = ""  # which board answered: a restarted board answers with no loads until replicas report again


def scaled_to_zero(status: str, running: int) -> bool:
    """No running replica because the autoscaler chose none (HEALTHY: Serve's target, zero, is met) or is bringing
    one back (UPSCALING), rather than because the replicas died (UNHEALTHY until replaced)."""
    return running == 0 and status in ("HEALTHY", "UPSCALING")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
                  logging_config={"enable_access_log": False})  # replicas report several times a second
class LoadBoard:
    def __init__(self):
        self.reports: dict[str, tuple[str, EngineLoad, float]] = {}
        context = serve.get_replica_context()
        self.app, self.board_id = context.app_name, context.replica_id.unique_id
        self.starting_since: dict[str, float] = {}
        self.ran: set[str] = set()  # deployments seen with a running replica
        self.lost: list[str] = []  # deployments that ran and, at the last read, have no running replica, not by choice
        self.idle: set[str] = set()  # deployments at zero replicas by their autoscaler's choice
        self.waking: dict[str, float] = {}  # idle deployments with a replica starting: since when
        self.cold_start_s: dict[str, float] = {}  # the last measured start from zero, by deployment
        self.draining = False  # the app is shutting down: ingresses take no new requests
        self._watch = asyncio.get_event_loop().create_task(self.watch_replicas())

    async def watch_replicas(self) -> None:
        from app.serve.metrics import set_replicas

        while True:
            await asyncio.sleep(WATCH_S)
            try:
                deployments = (await asyncio.to_thread(app_states))[self.app].deployments
            except Exception as e:  # noqa: BLE001 - the app is being deleted or redeployed
                logger.info("replica states unavailable: %s: %s", type(e).__name__, e)
                continue
            now = time.monotonic()
            running = {name for name, d in deployments.items() if d.replica_states.get("RUNNING", 0)}
            self.ran |= running
            idle = {name for name, d in deployments.items()
                    if scaled_to_zero(d.status, d.replica_states.get("RUNNING", 0))}
            for name, d in deployments.items():
                self.time_cold_start(name, name in idle, d.replica_states.get("STARTING", 0) > 0, name in running, now)
            self.idle = idle
            self.lost = sorted(self.ran - running - idle)
            for name, d in deployments.items():
                for state in ("RUNNING", "STARTING"):
                    set_replicas(name, state, d.replica_states.get(state, 0))
                if not d.replica_states.get("STARTING"):
                    self.starting_since.pop(name, None)
                    continue
                since = self.starting_since.setdefault(name, now)
                if now - since >= PENDING_WARN_S:
                    logger.warning("deployment %s has %d replica(s) not placed after %.0f s: %s", name,
                                   d.replica_states["STARTING"], now - since, d.message or "waiting for resources")
                    self.starting_since[name] = now  # say it again after another PENDING_WARN_S

    def time_cold_start(self, name: str, idle: bool, starting: bool, running: bool, now: float) -> None:
        """A deployment seen idle that starts a replica is waking from then; once one runs, its cold start is
        measured and logged."""
        if running and name in self.waking:
            self.cold_start_s[name] = now - self.waking.pop(name)
            logger.info("deployment %s started from zero replicas in %.1f s", name, self.cold_start_s[name])
        elif starting and not running and (name in self.idle or idle):
            self.waking.setdefault(name, now)

    def report(self, replica: str, pool: str, load: EngineLoad) -> None:
        self.reports[replica] = (pool, load, time.monotonic())

    def withdraw(self, replica: str) -> None:
        """A replica being stopped (scaled down, redeployed) takes its load off the board at once: routers stop
        pricing it, and a pool scaled to zero reads idle, now rather than ``STALE_S`` after its last report."""
        self.reports.pop(replica, None)

    def drain(self) -> None:
        """From now on every ingress refuses new requests (it reads this within ``REPORT_S``); those already
        admitted run to their end."""
        self.draining = True

    def view(self) -> BoardState:
        """What an ingress reads each beat, in one call."""
        return BoardState(self.snapshot(), self.lost, sorted(self.idle), dict(self.cold_start_s), self.draining,
                          self.board_id)

    def snapshot(self) -> dict[str, list[EngineLoad]]:
        """Every live replica's latest load, by pool."""
        now = time.monotonic()
        self.reports = {r: v for r, v in self.reports.items() if now - v[2] < STALE_S}
        by_pool: dict[str, list[EngineLoad]] = {}
        for pool, load, _ in self.reports.values():
            by_pool.setdefault(pool, []).append(load)
        return by_pool
