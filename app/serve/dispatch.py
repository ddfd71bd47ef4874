"""Running a request on the pool it was routed to: start, retries, deadlines, aggregated and disaggregated runs.

Failures (``Dispatcher.start``): a request whose replica fails (its engine stopped: ``EngineFailed``; its actor died)
before anything reached the client (a stream's first update, a whole answer) is retried, up to ``max_retries`` times,
on another replica of the pool or on another pool that fits; the failed replica is skipped from that moment
(``failed_replicas.FAILED``, which the request routers of this process read), and so is a pool none of whose replicas
is left. A failure after the first update cannot be hidden (tokens were sent): the stream ends with an error.

A request's generation is cancelled in its replica whenever its caller stops listening: a client gone, or the app's
request timeout (``with_deadline``) passed. Until its first update a request's prompt tokens count as queued on its
pool (``queued``), and the pool is taken to hold its prefix from the moment it is sent (``prefixes``): what this
ingress sent itself, which pricing adds to the board's lagging reports.

A call still waiting for its answer (a stream: its first update) when every replica it may go to is known to have
failed is given up (``unless_failed``): retried elsewhere or answered 503 at once, like a new request to that pool,
rather than left waiting in Serve's request router for the replacement.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from app.engine.blocks import prefix_hashes
from app.engine.messages import EngineFailed, Handoff, Update, merge_updates
from app.engine.params import SamplingParams
from app.serve.board_view import BoardView
from app.serve.config import AppConfig, PoolConfig
from app.serve.errors import Overloaded, RequestTimeout, cause_of
from app.serve.failed_replicas import FAILED
from app.serve.load import DECODE_ROLE, REPORT_S
from app.serve.metrics import record_retry
from app.serve.prefix_router import PrefixIndex
from app.serve.pricing import POOL_PREFIX_BLOCKS, PoolLoad, Route

logger = logging.getLogger("ray.serve")
# (prompt ids, max_tokens, pool, strategy, pools to avoid) -> the route to try next
Pick = Callable[[list[int], int, str | None, str, frozenset[str]], Awaitable[Route]]


async def with_deadline(updates: AsyncIterator[Update], timeout_s: float | None,
                        limit_s: float | None = None) -> AsyncIterator[Update]:
    """``updates`` until ``timeout_s`` from now (None: no limit); then ``RequestTimeout`` (naming ``limit_s``, the
    configured limit, when the request had already spent part of it), and closing ``updates`` cancels the generation
    in its replica (``Dispatcher.run``) so it frees its KV slot."""
    limit_s = timeout_s if limit_s is None else limit_s
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                async with asyncio.timeout(left):  # not wait_for, which loses a cancel on 3.11 (EngineLoop._next)
                    update = await anext(updates)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeout(f"the request ran past this server's request_timeout_s of {limit_s:g} s; "
                                     "ask for fewer tokens or retry later") from None
            yield update
    finally:
        await updates.aclose()


async def until_finished(call) -> AsyncIterator[Update]:
    """The updates of a streaming Serve call; leaving before the last one cancels it in its replica."""
    finished = False
    try:
        async for update in call:
            finished = update.finish_reason is not None
            yield update
    finally:
        if not finished:
            call.cancel()


async def cancelled_with_caller(call) -> Update:
    """The answer of a unary Serve call; if the caller gives up first (cancelled, timed out), so does the call."""
    try:
        return await call
    except BaseException:
        call.cancel()
        raise


async def unless_failed(answer: Awaitable[Update | None], failed: Callable[[], str | None]) -> Update | None:
    """``answer`` (a call's, or a stream's first update), unless ``failed()`` names where every replica the call may
    go to is known to have failed or been lost (``BoardView.gone``, looked at every ``REPORT_S``) before it comes:
    then the call is cancelled and ``EngineFailed`` raised, so ``Dispatcher.start`` retries the request elsewhere or
    answers 503 at once. Otherwise a request admitted to a pool just before this ingress learnt that its last replica
    failed waited in Serve's request router for the replacement, a minute (test_chaos's hung pool: the client's next
    request after the first 503 hung there instead of seeing the pool down), or for ever when the replica's node was
    lost (test_serve_cluster: no node offers the pool's resource). A call that already runs on a failed replica fails
    anyway."""
    task = asyncio.ensure_future(answer)
    try:
        while not (await asyncio.wait({task}, timeout=REPORT_S))[0]:
            if where := failed():
                raise EngineFailed(f"every replica of {where} failed while the request waited for one; Serve is "
                                   "replacing them")
        return task.result()
    finally:
        if not task.done():  # given up, or the caller left: cancel the call
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def remote(method, *args):
    """``method.remote(*args)`` (a Serve handle's method) with an internal request id of its own. A call made within
    an ingress request inherits the request's, and Serve's request router (2.60) indexes the calls waiting for a
    replica by it: of several made at once (a request's choices) all but one would wait for ever."""
    from ray.serve import context
    from ray.serve._private.utils import generate_request_id

    request = context._get_serve_request_context()
    token = context._serve_request_context.set(dataclasses.replace(request,
                                                                   _internal_request_id=generate_request_id()))
    try:
        return method.remote(*args)
    finally:
        context._serve_request_context.reset(token)


@dataclass
class PoolHandles:
    """An aggregated pool has ``engine``; a disaggregated one has ``prefill`` and ``decode``."""

    engine: object | None = None
    prefill: object | None = None
    decode: object | None = None

    @property
    def front(self):
        return self.engine or self.prefill


def replica_failed(e: BaseException, board: BoardView) -> bool:
    """Whether ``e`` says the request's replica failed, so that starting it again elsewhere is right. A replica
    whose engine failed (``EngineFailed`` names it), or whose actor died (a node lost: the board's reports name the
    replica by its actor), is skipped from now on by this process's routers, and its pool, if it was the last one
    there, refused at once (``BoardView.serving``) until Serve replaces it."""
    from ray.exceptions import RayActorError

    cause = cause_of(e)
    if isinstance(cause, EngineFailed):
        FAILED.add(cause.replica)
    elif isinstance(cause, RayActorError) and cause.actor_id:
        FAILED.add(board.replica_of_actor(cause.actor_id))
    return isinstance(cause, (EngineFailed, RayActorError))


class Dispatcher:
    def __init__(self, cfg: AppConfig, handles: dict[str, PoolHandles], board: BoardView):
        self.cfg, self.handles, self.board = cfg, handles, board
        self.queued = {p.name: 0 for p in cfg.pools}  # prompt tokens sent from here, waiting for their first token
        self.inflight: dict[str, dict[int, list[int]]] = {p.name: {} for p in cfg.pools}  # id -> [max_tokens, seen]
        self.prefixes = {p.name: PrefixIndex(POOL_PREFIX_BLOCKS) for p in cfg.pools}  # chains sent to each pool
        self._ids = itertools.count()

    def load(self, pool: PoolConfig) -> PoolLoad:
        """``pool``'s load: the board's reports and what this ingress sent there itself."""
        load = self.board.load(pool)
        load.queued, load.inflight = self.queued[pool.name], list(self.inflight[pool.name].values())
        return load

    async def start(self, pick: Pick, prompt_ids: list[int], params: SamplingParams, pool: str | None, strategy: str,
                    whole: bool = False, timeout_s: float | None = None
                    ) -> tuple[Route, int, Update, AsyncIterator[Update]]:
        """Pick a route (``pick``) and run the request up to its first update (with ``whole``: its whole answer);
        returns (the route, the retries it took, the first update, the rest). A replica failure before the first
        update starts the request again elsewhere (at most ``max_retries`` times), the failed replica (or a pool left
        without replicas) skipped; the last failure is raised when no other place is left. ``timeout_s`` bounds the
        whole request, retries included."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        avoid: set[str] = set()
        failure: BaseException | None = None
        for retries in range(self.cfg.max_retries + 1):
            try:
                route = await pick(prompt_ids, params.max_tokens, pool, strategy, frozenset(avoid))
            except (Overloaded, EngineFailed) as e:
                if failure is None:
                    raise
                logger.warning("a failed request has nowhere else to go: %s", e)
                raise failure from None  # nowhere else to go: the client learns what failed
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            updates = with_deadline(self.run(route, prompt_ids, params, strategy, whole), left, timeout_s)
            try:
                return route, retries, await anext(updates), updates
            except Exception as e:
                await updates.aclose()
                if not replica_failed(e, self.board):
                    raise
                failure = e
                if retries < self.cfg.max_retries:
                    record_retry(route.pool.name)
                    logger.warning("a request's replica in pool %s failed before its first token; starting it again "
                                   "(retry %d of %d): %s", route.pool.name, retries + 1, self.cfg.max_retries,
                                   str(cause_of(e)).splitlines()[0][:200])
                if not getattr(cause_of(e), "replica", None) and len(self.board.loads(route.pool.name)) < 2:
                    avoid.add(route.pool.name)  # a replica not named (its actor died): go where another one runs
        raise failure

    async def run(self, route: Route, prompt_ids: list[int], params: SamplingParams, strategy: str = "auto",
                  whole: bool = False) -> AsyncIterator[Update]:
        """Updates of the request on ``route``'s pool; the first arrives after prefill (strategy known), or with
        ``whole`` the answer arrives as one update (non-streaming: one message per hop instead of one per step).
        Its prompt tokens count as queued on the pool until its first update; leaving early cancels the call. The
        pool is taken to hold the prompt's prefix from now on."""
        name, n = route.pool.name, len(prompt_ids)
        hashes = route.hashes if route.hashes is not None else prefix_hashes(prompt_ids, route.pool.block_size)
        self.prefixes[name].record(name, hashes)
        handles = self.handles[name]
        run = run_aggregated if handles.engine is not None else run_disaggregated
        rid, progress = next(self._ids), [params.max_tokens, 0]
        self.queued[name] += n
        self.inflight[name][rid] = progress
        prefilled = False
        try:
            def failed(role: str) -> str | None:
                return f"pool {name}{role}" if self.board.gone(route.pool, role) else None

            async with aclosing(run(handles, prompt_ids, params.model_dump(), strategy, whole, failed)) as updates:
                async for update in updates:
                    if not prefilled:
                        self.queued[name] -= n
                        prefilled = True
                    progress[1] += len(update.token_ids)
                    yield update
        except Exception as e:
            replica_failed(e, self.board)  # stop routing to a failed replica now, not at its health check
            raise
        finally:
            del self.inflight[name][rid]
            if not prefilled:
                self.queued[name] -= n


# role ("": the pool's engine or prefill replicas, DECODE_ROLE: its decode ones) -> where every replica of that role
# is known to have failed or been lost (``BoardView.gone``; None: some may still answer)
Failed = Callable[[str], str | None]


async def streamed(call, failed: Callable[[], str | None]) -> AsyncIterator[Update]:
    """A streaming call's updates (``until_finished``), the first ``unless_failed``."""
    async with aclosing(until_finished(call)) as updates:
        first = await unless_failed(anext(updates, None), failed)
        if first is None:
            return
        yield first
        async for update in updates:
            yield update


async def run_aggregated(handles: PoolHandles, prompt_ids: list[int], params: dict, strategy: str,
                         whole: bool, failed: Failed) -> AsyncIterator[Update]:
    """One engine replica prefills and decodes."""
    engine = functools.partial(failed, "")
    if whole:
        yield await unless_failed(cancelled_with_caller(remote(handles.engine.generate_whole, prompt_ids, params,
                                                               strategy)), engine)
        return
    call = remote(handles.engine.options(stream=True).generate, prompt_ids, params, strategy)
    async with aclosing(streamed(call, engine)) as updates:
        async for update in updates:
            yield update


async def run_disaggregated(handles: PoolHandles, prompt_ids: list[int], params: dict, strategy: str,
                            whole: bool, failed: Failed) -> AsyncIterator[Update]:
    """A prefill replica runs the prompt to its first token and leaves its K/V in the object store; a decode
    replica takes it over rank to rank and finishes the request. Each hop is given up if its half failed."""
    decode = functools.partial(failed, DECODE_ROLE)
    first: Update = await unless_failed(cancelled_with_caller(remote(handles.prefill.prefill, prompt_ids, params,
                                                                     strategy)), functools.partial(failed, ""))
    handoff: Handoff | None = first.handoff
    first.handoff = None
    if handoff is None or params["max_tokens"] <= 1 or first.finish_reason != "length":
        yield first
        return
    # The decode replica re-emits the first token with its text; report only the prefill's figures here.
    figures = Update(text="", token_ids=[], finish_reason=None, prompt_tokens=len(prompt_ids),
                     completion_tokens=0, prefill_strategy=first.prefill_strategy, prefill_s=first.prefill_s,
                     ttft_s=first.ttft_s, tpot_s=None, cached_tokens=first.cached_tokens,
                     prompt_logprobs=first.prompt_logprobs)
    if whole:
        rest = await unless_failed(cancelled_with_caller(remote(handles.decode.decode_whole, handoff, params)), decode)
        yield merge_updates([figures, rest])
        return
    yield figures
    call = remote(handles.decode.options(stream=True).decode, handoff, params)
    async with aclosing(streamed(call, decode)) as updates:
        async for update in updates:
            yield update
