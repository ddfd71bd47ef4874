"""One ingress's view of the ``LoadBoard``: which pools serve, how loaded they are, whether the app is ready or draining.

Everything here is read from the board's last snapshot, never by asking a replica, so a hung or busy replica cannot
slow it down: ``/health`` answers from it in milliseconds, and the router prices and admits by it. The view is
refreshed on the board's beat (``REPORT_S``) by one task per ingress replica (``watch``); replicas the board reports
failed are added to ``FAILED`` at once, so this process's request routers skip them before their health check.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Literal

from pydantic import BaseModel, Field

from app.engine.messages import EngineLoad
from app.serve.config import AppConfig, PoolConfig
from app.serve.failed_replicas import FAILED
from app.serve.load import DECODE_ROLE, REPORT_S, BoardState
from app.serve.pricing import PoolLoad


def roles(pool: PoolConfig) -> tuple[str, ...]:
    """``pool``'s roles as the board keys them: "" (its engine or prefill replicas), and ``DECODE_ROLE`` when
    disaggregated."""
    return ("", DECODE_ROLE) if pool.disaggregated else ("",)


def report_keys(pool: PoolConfig) -> tuple[str, ...]:
    """The board keys ``pool``'s replicas report under: the pool, and its decode half when disaggregated."""
    return tuple(pool.name + role for role in roles(pool))


def deployment_of(pool: PoolConfig, role: str) -> str:
    """The Serve deployment of ``pool``'s ``role`` ("": its engine or prefill replicas, ``DECODE_ROLE``: decode)."""
    return pool.deployments["decode" if role == DECODE_ROLE else "prefill" if pool.disaggregated else "engine"]


class PoolState(BaseModel):
    """A pool as the load board shows it (``/health``)."""

    replicas: int = Field(description="replicas that report and have not failed (a replica reports once its engine "
                                      "has run its warm-up steps)")
    failed: int = Field(description="replicas known to have failed (Serve replaces them)")
    lost: bool = Field(description="Serve says the pool lost every replica it had running (a node lost)")
    idle: bool = Field(False, description="the pool's autoscaler took it to zero replicas; a request starts one")
    cold_start_s: float | None = Field(None, description="its last measured start from zero replicas")
    serving: bool = Field(description="new requests can go there")


class Health(BaseModel):
    """``/health``: the app as the load board shows it, answered without asking any engine."""

    status: Literal["ok", "degraded", "starting", "unavailable", "draining"] = Field(description=(
        "ok: every pool has a warmed replica or is idle (at zero replicas by its autoscaler); degraded: some pool has none (being replaced) while others serve; "
        "starting: not every pool has had one yet; unavailable: no pool serves; draining: shutting down"))
    model: str
    pools: dict[str, PoolState]
    reason: str | None = None


class BoardView:
    """The board's last snapshot as this ingress read it (``board`` None: no board, every pool taken as warmed)."""

    def __init__(self, cfg: AppConfig, board=None):
        self.cfg, self.board = cfg, board
        self.reported: dict[str, list[EngineLoad]] = {}  # the board's last snapshot
        self.board_id = ""  # the board replica that gave it
        self.down: set[str] = set()  # deployments that lost every running replica (the board says)
        self.idle: set[str] = set()  # deployments at zero replicas by their autoscaler's choice (the board says)
        self.cold_start_s: dict[str, float] = {}  # by deployment, the last measured start from zero
        self.draining = False  # the app is shutting down (the board says): no new requests
        self.ready = board is None  # every pool has had a warmed replica (the board said so once)
        self._reader: asyncio.Task | None = None

    def watch(self) -> None:
        """Start reading the board (once; needs the running event loop)."""
        if self.board is not None and self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self.read())

    async def read(self) -> None:
        """Keep ``reported`` fresh: every engine replica's load, as every ingress replica sees it."""
        while True:
            try:
                state: BoardState = await self.board.view.remote()
            except Exception:  # noqa: BLE001 - the board restarting: keep the last figures, try again
                pass
            else:
                for x in itertools.chain.from_iterable(state.loads.values()):
                    if x.failed:
                        FAILED.add(x.replica)
                if state.loads or state.board_id == self.board_id:  # empty from a new board: it just restarted
                    self.reported = state.loads
                self.board_id = state.board_id
                self.down, self.idle, self.draining = set(state.lost), set(state.idle), state.draining
                self.cold_start_s = state.cold_start_s
                self.ready = self.ready or all(self.warmed(p) or self.asleep(p) for p in self.cfg.pools)
            await asyncio.sleep(REPORT_S)

    def loads(self, key: str) -> list[EngineLoad]:
        """The reports of the replicas under ``key`` (a pool, or its decode half) that have not failed."""
        return [x for x in self.reported.get(key, []) if x.replica not in FAILED]

    def replica_of_actor(self, actor_id: str) -> str:
        """The replica whose Ray actor is ``actor_id`` ("" if none reports it)."""
        return next((x.replica for x in itertools.chain.from_iterable(self.reported.values()) if x.actor == actor_id),
                    "")

    def load(self, pool: PoolConfig) -> PoolLoad:
        """``pool``'s load as the board reports it (what this ingress sent itself is the dispatcher's to add)."""
        return PoolLoad(front=self.loads(pool.name), decode=self.loads(pool.name + DECODE_ROLE))

    def warmed(self, pool: PoolConfig) -> bool:
        """Whether a replica of ``pool`` (of each half, if disaggregated) reports, not failed: replicas report once
        their engine has run its warm-up steps. (No board: taken as warmed.)"""
        return self.board is None or all(self.loads(k) for k in report_keys(pool))

    def asleep(self, pool: PoolConfig) -> bool:
        """Whether ``pool`` is at zero replicas by its autoscaler's choice, none reporting: a request wakes it."""
        return set(pool.deployments.values()) <= self.idle and not any(self.loads(k) for k in report_keys(pool))

    def cold_start(self, pool: PoolConfig) -> float:
        """Seconds a request to ``pool`` waits for a replica to start: its last measured start from zero while
        it is asleep (the longest of its deployments'), else 0."""
        if not self.asleep(pool):
            return 0.0
        return max((self.cold_start_s.get(d, 0.0) for d in pool.deployments.values()), default=0.0)

    def failed(self, key: str) -> bool:
        """Whether every replica reporting under ``key`` (a pool, or its decode half) is known to have failed: this
        process's request routers choose none of them, so a call there waits for Serve's replacement (a minute).
        Nothing reported yet (starting, or reports lagging) is not failed."""
        return bool(self.reported.get(key)) and not self.loads(key)

    def gone(self, pool: PoolConfig, role: str = "") -> bool:
        """Whether no replica of ``pool``'s ``role`` can take a call until Serve replaces one: every replica
        reporting under it is known to have failed (``failed``), or Serve told the board the deployment lost every
        running replica (a node lost: its reports may have aged out, and Serve's request router, holding no replica,
        would keep a call waiting for one that is not coming)."""
        return self.failed(pool.name + role) or deployment_of(pool, role) in self.down

    def serving(self, pool: PoolConfig) -> bool:
        """False while a deployment of the pool (either half of a disaggregated one) is ``gone``: until Serve
        replaces a replica, the pool takes nothing (503 at once rather than a wait for a replica that is not coming
        soon). A pool whose replicas have not reported yet (still starting) may serve. (A pool whose reports merely
        stopped is not taken for gone: under a flood on few cores, reports lag.)"""
        return not any(self.gone(pool, role) for role in roles(pool))

    def pool_states(self) -> dict[str, PoolState]:
        """Each pool's replicas as the board last said, without asking any replica."""
        states = {}
        for p in self.cfg.pools:
            reported = [x for k in report_keys(p) for x in self.reported.get(k, [])]
            failed = sum(1 for x in reported if x.replica in FAILED)  # the reader added every x.failed to FAILED
            states[p.name] = PoolState(replicas=len(reported) - failed, failed=failed,
                                       lost=bool(self.down & set(p.deployments.values())), idle=self.asleep(p),
                                       cold_start_s=max((self.cold_start_s[d] for d in p.deployments.values()
                                                         if d in self.cold_start_s), default=None),
                                       serving=(self.warmed(p) or self.asleep(p)) and self.serving(p))
        return states

    def health(self) -> Health:
        """Liveness and readiness from the load board (every engine replica reports a few times a second), so it
        answers in milliseconds under any load and while a pool hangs. Ready means every pool has had a warmed
        replica; from then on a pool being replaced makes the app degraded, not down."""
        self.watch()
        states = self.pool_states()
        serving = [name for name, s in states.items() if s.serving]
        waiting = ", ".join(name for name in states if name not in serving)
        if self.draining:
            status, reason = "draining", "this server is shutting down"
        elif len(serving) == len(states):
            status, reason = "ok", None
        elif not self.ready:
            status, reason = "starting", f"no warmed replica yet in pool {waiting}"
        elif serving:
            status, reason = "degraded", f"no replica serving in pool {waiting} (being replaced)"
        else:
            status, reason = "unavailable", f"no replica serving in pool {waiting}"
        return Health(status=status, model=self.cfg.model_name, pools=states, reason=reason)
