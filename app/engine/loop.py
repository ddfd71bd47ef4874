"""Run a synchronous ``LLMEngine`` in one dedicated thread and serve it to asyncio callers.

The engine is not thread-safe and each ``step`` blocks for a forward pass, so one thread owns it: it drains an inbox
of start/abort commands between steps (new requests join at iteration boundaries) and pushes one ``Update`` per
sequence per step onto that request's asyncio queue. A caller that goes away (client disconnect, cancelled stream)
aborts its sequence, which frees its KV blocks at the next iteration. If a step fails (a shard worker died) the thread
ends: every request it holds, and every one that arrives later, gets ``EngineFailed`` rather than waiting forever,
and the replica reports itself unhealthy so Serve replaces it.

A worker that hangs instead of dying (SIGSTOP, a stuck collective; one device has no collective to time out) would
block the step for ever: a watchdog thread fails the engine the same way once a step has run past its deadline
(``WATCHDOG_FACTOR`` times the planner's prediction for that step, at least ``watchdog_floor_s``).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.engine.llm_engine import LLMEngine
from app.engine.messages import EngineFailed, EngineLoad, SequenceFailed, Update, merge_updates
from app.engine.sequence import Sequence

POLL_S = 1.0  # how often a waiting caller checks that the engine thread still runs
WATCHDOG_POLL_S = 0.25  # how often the watchdog looks at the running step


class StepTimeout(RuntimeError):
    """A step ran past its watchdog deadline: a worker hangs."""


def update_of(seq: Sequence, sent: int) -> Update:
    """The ``Update`` for ``seq`` after a step, ``sent`` of its tokens having been reported already."""
    return Update(text=seq.take_delta(), token_ids=seq.output_ids[sent:], finish_reason=seq.finish_reason,
                  prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                  prefill_strategy=seq.prefill_strategy, prefill_s=seq.prefill_s, ttft_s=seq.ttft_s,
                  tpot_s=seq.tpot_s, handoff=seq.handoff, cached_tokens=seq.cached_tokens,
                  logprobs=seq.logprobs[sent:] if seq.params.logprobs is not None else None,
                  prompt_logprobs=seq.prompt_logprobs if not sent else None)


@dataclass
class _Job:
    start: Callable[[LLMEngine], Sequence]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    seq: Sequence | None = None
    sent: int = 0  # tokens already reported
    done: bool = field(default=False)


class EngineLoop:
    """The engine's thread. ``submit`` starts a request and yields its updates until it finishes."""

    def __init__(self, engine: LLMEngine, name: str = "engine", replica: str = ""):
        self.engine, self.replica = engine, replica
        self.error: BaseException | None = None  # set when a step failed: the replica is unhealthy
        self._inbox: queue.Queue = queue.Queue()
        self._jobs: dict[int, _Job] = {}
        self._failing = threading.Lock()
        self._stop = threading.Event()
        self.load: EngineLoad = engine.load()  # refreshed by the engine thread at every iteration
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def queued_tokens(self) -> int:
        return self.load.waiting_prompt_tokens

    async def submit(self, start: Callable[[LLMEngine], Sequence]) -> AsyncIterator[Update]:
        """``start(engine)`` runs in the engine thread (e.g. ``engine.add(...)``); its ``RequestError`` is raised
        here. Updates stream until the sequence finishes, those of steps that ran while the caller was away merged
        into one; leaving early aborts it."""
        self._check()
        job = _Job(start=start, loop=asyncio.get_running_loop(), out=asyncio.Queue())
        self._inbox.put(("start", job))
        try:
            while True:
                items = [await self._next(job)]
                while not job.out.empty():  # steps that ran while the caller was busy: one message, not many
                    items.append(job.out.get_nowait())
                updates = [u for u in items if isinstance(u, Update)]
                if updates:
                    update = merge_updates(updates)
                    if update.finish_reason is not None:
                        job.done = True
                    yield update
                    if job.done:
                        return
                errors = [e for e in items if isinstance(e, BaseException)]
                if errors:
                    raise errors[0]
        finally:
            if not job.done:
                self._inbox.put(("abort", job))

    async def run_whole(self, start: Callable[[LLMEngine], Sequence]) -> Update:
        """``submit`` to the end, as one update (a non-streaming request: one message instead of one per step)."""
        updates = [u async for u in self.submit(start)]
        return merge_updates(updates)

    def _check(self) -> None:
        if not self.alive:
            raise EngineFailed(f"engine stopped: {self.error!r}" if self.error else "engine stopped", self.replica)

    async def _next(self, job: _Job) -> Any:
        """The job's next item; if the thread has died meanwhile (with this job never started, or its failure
        already sent), ``EngineFailed`` instead of waiting for ever."""
        while True:
            try:
                async with asyncio.timeout(POLL_S):  # not wait_for: on 3.11 it swallows a cancel that lands
                    return await job.out.get()      # in the tick an item arrives, and the generation runs on
            except TimeoutError:
                if job.out.empty():
                    self._check()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    # -- the thread --------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._drain(block=not self.engine.has_work()):
                self.load = self.engine.load()  # the requests just taken
            if self._stop.is_set():
                break
            try:
                stepped = self.engine.step()
            except Exception as e:  # a dead worker or a bug: fail every request, report unhealthy
                self._fail(e)
                return
            if self.error is not None:  # the watchdog gave up on this step: its requests were failed already
                return
            self.load = self.engine.load()  # what the step left: an idle replica must not report its last prompt
            for seq in stepped:
                job = self._jobs.get(seq.id)
                if job is None:
                    continue
                if seq.finish_reason == "error":  # this request failed alone: an error, not a finish reason
                    del self._jobs[seq.id]
                    self._send(job, SequenceFailed(seq.error or "generation failed"))
                    continue
                update = update_of(seq, job.sent)
                job.sent = len(seq.output_ids)
                if seq.finished:
                    del self._jobs[seq.id]
                self._send(job, update)

    def _watch(self) -> None:
        """Fail the engine when a step outlives its deadline (the stepping thread is stuck in the call)."""
        while not self._stop.is_set() and self.error is None and self._thread.is_alive():
            started, deadline = self.engine.step_started, self.engine.step_deadline_s
            if started is not None and time.perf_counter() - started > deadline:
                self._fail(StepTimeout(f"an engine step ran past its watchdog deadline of {deadline:.1f} s: a shard "
                                       "worker is hung"))
                return
            time.sleep(WATCHDOG_POLL_S)

    def _fail(self, e: BaseException) -> None:
        """Every request held gets ``EngineFailed``; the replica reports unhealthy from now on."""
        with self._failing:
            if self.error is not None:
                return
            self.error = e
            for job in list(self._jobs.values()):
                self._send(job, EngineFailed(f"engine step failed: {type(e).__name__}: {e}", self.replica))

    def _drain(self, block: bool) -> bool:
        """Take the commands waiting (waiting up to half a second for one when ``block``); whether there were any."""
        try:
            cmd, job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            if cmd == "start":
                try:
                    job.seq = job.start(self.engine)
                    self._jobs[job.seq.id] = job
                except Exception as e:  # noqa: BLE001 - the client's mistake (RequestError: 400) or a bug here (500):
                    self._send(job, e)  # this request fails alone; the engine thread goes on
            elif cmd == "abort" and job.seq is not None and not job.seq.finished:
                self.engine.abort(job.seq)
                self._jobs.pop(job.seq.id, None)
            try:
                cmd, job = self._inbox.get_nowait()
            except queue.Empty:
                return True

    @staticmethod
    def _send(job: _Job, item: Any) -> None:
        job.loop.call_soon_threadsafe(job.out.put_nowait, item)
