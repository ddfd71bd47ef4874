"""Pick a pool for a tokenized request and run it there; shared by the HTTP and the gRPC front ends.

Picking a pool asks the planner, per pool that can hold the request (prompt + max_tokens within its context), for
the predicted prefill time of this prompt on that pool's devices, batched with the prompts already waiting there,
after the pool's expected wait for a free slot (``backlog``: from the replicas' reports on the ``LoadBoard`` and
from what this ingress sent itself), plus ``max_tokens`` decode steps at the pool's measured step time; the lowest
sum wins (ties go to the pool listed first), so a pool that prefills sooner but decodes slower does not take short
requests it would finish later. A pool that probably holds the prompt's prefix in its KV cache (this ingress sent it
there: ``PrefixIndex``, bounded by the KV blocks the pool's replicas report) is priced for the rest of the prompt
only, attending to the cached prefix, so of pools otherwise equal a request goes where its prefix is; within the
pool, ``PrefixAffinityRouter`` then picks the replica that holds it. Admission control: a pool whose expected wait
passes ``max_queue_wait_s``, or whose waiting tokens would pass ``max_queued_tokens``, is skipped; if every pool is
skipped the request is refused at once as overloaded (503 with ``retry-after``), rather than accepted and left to
time out. A request's generation is cancelled in its replica whenever its caller stops listening: a client gone, or
the app's request timeout (``with_deadline``) passed.

Failures (``start``): a request whose replica fails (its engine stopped: ``EngineFailed``; its actor died) before
anything reached the client (a stream's first update, a whole answer) is retried, up to ``max_retries`` times, on
another replica of the pool or on another pool that fits; the failed replica is skipped from that moment
(``prefix_router.FAILED``, which the request routers of this process read), and so is a pool none of whose replicas
is left. A failure after the first update cannot be hidden (tokens were sent): the stream ends with an error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from app.engine.blocks import prefix_hashes
from app.engine.build import guessed_step_s
from app.engine.messages import EngineFailed, EngineLoad, Handoff, RequestError, Update, merge_updates
from app.engine.sampling import SamplingParams
from app.serve.config import AppConfig, PoolConfig
from app.serve.errors import Overloaded, RequestTimeout, ShuttingDown, cause_of
from app.serve.load import DECODE_ROLE, REPORT_S
from app.serve.metrics import record_retry, set_expected_wait
from app.serve.failed_replicas import FAILED
from app.serve.prefix_router import PrefixIndex
from strategies.cost import decode_step_time, plan_prefill
from strategies.layout import check_strategy
from strategies.loader import Checkpoint

logger = logging.getLogger("ray.serve")
POOL_PREFIX_BLOCKS = 16384  # block hashes remembered per pool until its replicas report how many blocks they hold


async def with_deadline(updates: AsyncIterator[Update], timeout_s: float | None,
                        limit_s: float | None = None) -> AsyncIterator[Update]:
    """``updates`` until ``timeout_s`` from now (None: no limit); then ``RequestTimeout`` (naming ``limit_s``, the
    configured limit, when the request had already spent part of it), and closing ``updates`` cancels the generation
    in its replica (``Router.run``) so it frees its KV slot."""
    limit_s = timeout_s if limit_s is None else limit_s
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                update = await asyncio.wait_for(anext(updates), left)
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


@dataclass
class PoolHandles:
    """An aggregated pool has ``engine``; a disaggregated one has ``prefill`` and ``decode``."""

    engine: object | None = None
    prefill: object | None = None
    decode: object | None = None

    @property
    def front(self):
        return self.engine or self.prefill


@dataclass
class Route:
    pool: PoolConfig
    predicted_s: float  # predicted time to the last token: first token (queue included), then the decode steps
    ttft_s: float = 0.0  # of which to the first token
    cached_tokens: int = 0  # prompt tokens predicted to be in the pool's prefix cache
    hashes: list[int] | None = None  # the prompt's block-hash chain at the pool's block size (None: not known)


def report_keys(pool: PoolConfig) -> tuple[str, ...]:
    """The board keys ``pool``'s replicas report under: the pool, and its decode half when disaggregated."""
    return (pool.name, pool.name + DECODE_ROLE) if pool.disaggregated else (pool.name,)


class PoolState(BaseModel):
    """A pool as the load board shows it (``/health``)."""

    replicas: int = Field(description="replicas that report and have not failed (a replica reports once its engine "
                                      "has run its warm-up steps)")
    failed: int = Field(description="replicas known to have failed (Serve replaces them)")
    lost: bool = Field(description="Serve says the pool lost every replica it had running (a node lost)")
    serving: bool = Field(description="new requests can go there")


@dataclass
class Result:
    """What a finished (or finishing) request reports, accumulated over its updates."""

    pool: str
    devices: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    strategy: str | None = None
    prefill_s: float = 0.0
    ttft_s: float | None = None  # from arrival at the ingress to the first update (whole answers: the engine's)
    tpot_s: float | None = None
    cached_tokens: int = 0  # prompt tokens the replica's prefix cache held
    retries: int = 0  # times the request was started again elsewhere after its replica failed (nothing sent yet)
    whole: bool = False  # the answer comes as one update (non-streaming): its TTFT is the engine's own
    started: float = field(default_factory=time.perf_counter)

    def add(self, u: Update) -> None:
        if self.whole and self.ttft_s is None:
            self.ttft_s = u.ttft_s
        self.text += u.text
        self.token_ids += u.token_ids
        self.finish_reason = u.finish_reason
        self.prompt_tokens = u.prompt_tokens
        self.strategy = self.strategy or u.prefill_strategy
        self.prefill_s = self.prefill_s or u.prefill_s
        self.cached_tokens = max(self.cached_tokens, u.cached_tokens)
        self.ttft_s = self.ttft_s if self.ttft_s is not None else time.perf_counter() - self.started
        self.tpot_s = u.tpot_s if u.tpot_s is not None else self.tpot_s


class Router:
    def __init__(self, cfg: AppConfig, handles: dict[str, PoolHandles], board=None):
        self.cfg, self.handles, self.board = cfg, handles, board
        ckpt = Checkpoint(cfg.model)
        self.tokenizer, self.shape = ckpt.tokenizer(), ckpt.shape
        self.hardware = {p.name: p.priced_hardware() for p in cfg.pools}
        self.queued = {p.name: 0 for p in cfg.pools}  # prompt tokens sent from here, waiting for their first token
        self.inflight: dict[str, dict[int, list[int]]] = {p.name: {} for p in cfg.pools}  # id -> [max_tokens, seen]
        self.reported: dict[str, list[EngineLoad]] = {}  # the board's last snapshot
        self.down: set[str] = set()  # deployments that lost every running replica (the board says)
        self.draining = False  # the app is shutting down (the board says): no new requests
        self.ready = board is None  # every pool has had a warmed replica (the board said so once)
        self.prefixes = {p.name: PrefixIndex(POOL_PREFIX_BLOCKS) for p in cfg.pools}  # chains sent to each pool
        self._ids = itertools.count()
        self._available: dict[str, list[str]] = {}
        self._reader: asyncio.Task | None = None

    # -- tokenizing --------------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.shape.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.shape.vocab_size - 1})")
            return list(prompt)
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise RequestError(f"model {self.cfg.model_name} has no chat template: use /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return list(ids)

    # -- picking a pool ----------------------------------------------------------------------------------------------

    async def pool_info(self, pool: str) -> dict:
        """Ask one of the pool's replicas what it can run and how loaded it is (waits while none is up)."""
        info = await self.handles[pool].front.info.remote()
        self._available[pool] = info["available"]
        return info

    async def available(self, pool: str) -> list[str]:
        """Strategies the pool's replicas can run (asked once: replicas of a pool are identical)."""
        if pool not in self._available:
            await self.pool_info(pool)
        return self._available[pool]

    def watch_board(self) -> None:
        """Start reading the board (once; needs the running event loop)."""
        if self.board is not None and self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self.read_board())

    def warmed(self, pool: PoolConfig) -> bool:
        """Whether a replica of ``pool`` (of each half, if disaggregated) reports, not failed: replicas report once
        their engine has run its warm-up steps. (No board: taken as warmed.)"""
        return self.board is None or all(self.loads(k) for k in report_keys(pool))

    def pool_states(self) -> dict[str, PoolState]:
        """Each pool's replicas as the board last said, without asking any replica (a hung or busy one cannot slow
        this down): answers ``/health`` in milliseconds."""
        states = {}
        for p in self.cfg.pools:
            reported = [x for k in report_keys(p) for x in self.reported.get(k, [])]
            failed = sum(1 for x in reported if x.failed or x.replica in FAILED)
            ready = self.warmed(p)
            states[p.name] = PoolState(replicas=len(reported) - failed, failed=failed,
                                       lost=bool(self.down & set(p.deployments.values())),
                                       serving=ready and self.serving(p))
        return states

    async def read_board(self) -> None:
        """Keep ``reported`` fresh: every engine replica's load, as every ingress replica sees it."""
        while True:
            try:
                reported, down, draining = await self.board.view.remote()
            except Exception:  # noqa: BLE001 - the board restarting: keep the last figures, try again
                pass
            else:
                for x in itertools.chain.from_iterable(reported.values()):
                    if x.failed:
                        FAILED.add(x.replica)
                if reported or not self.reported:  # an empty board after a full one: the board restarted
                    self.reported = reported
                self.down, self.draining = set(down), draining
                self.ready = self.ready or all(self.warmed(p) for p in self.cfg.pools)
            await asyncio.sleep(REPORT_S)

    def loads(self, key: str) -> list[EngineLoad]:
        """The reports of the replicas under ``key`` (a pool, or its decode half) that have not failed."""
        return [x for x in self.reported.get(key, []) if x.replica not in FAILED]

    def serving(self, pool: PoolConfig) -> bool:
        """False while a deployment of the pool has lost all its running replicas (as Serve told the board: a node
        lost), or once every replica reporting for the pool (or either half of a disaggregated pool) is known to have
        failed: until Serve replaces one, the pool takes nothing (503 at once rather than a wait for a replica that is
        not coming soon). A pool whose replicas have not reported yet (still starting) may serve. (A pool whose
        reports merely stopped is not taken for gone: under a flood on few cores, reports lag.)"""
        if self.down & set(pool.deployments.values()):  # no replica left at all (a node lost)
            return False
        return all(self.loads(k) or not self.reported.get(k) for k in report_keys(pool))

    def backlog(self, pool: PoolConfig) -> tuple[int, float]:
        """What a new request finds ahead of it in ``pool``: (prompt tokens waiting for prefill, seconds until a slot
        frees). From the replicas' reports (mean over replicas, plus the decode half of a disaggregated pool) or
        from what this ingress sent itself, whichever is more: the reports lag by up to a beat, and this ingress's
        own count misses the other ingresses' requests."""
        front = self.loads(pool.name)
        decode = self.loads(pool.name + DECODE_ROLE)
        mean = lambda loads, get: statistics.fmean(get(x) for x in loads) if loads else 0.0  # noqa: E731
        reported_tokens = mean(front, lambda x: x.waiting_prompt_tokens)
        reported_slot_wait = mean(front, lambda x: x.slot_wait_s) + mean(decode, lambda x: x.slot_wait_s)
        replicas = max(1, len(self.decoding(pool)))
        # measured, else (no report read yet: a burst as this ingress's first requests) as the engine first guesses it
        step = mean(self.decoding(pool), lambda x: x.step_s) or guessed_step_s(
            self.shape, self.hardware[pool.name], pool.devices, pool.max_model_len, pool.max_num_seqs)
        mine = self.inflight[pool.name].values()
        full = len(mine) >= pool.max_num_seqs * replicas
        own_slot_wait = step * sum(m - seen for m, seen in mine) / (pool.max_num_seqs * replicas) if full else 0.0
        return max(int(reported_tokens), self.queued[pool.name]), max(reported_slot_wait, own_slot_wait)

    def decoding(self, pool: PoolConfig) -> list[EngineLoad]:
        """The reports of the replicas that decode ``pool``'s requests: its decode half when disaggregated."""
        return self.loads(pool.name + DECODE_ROLE) or self.loads(pool.name)

    def decode_step_s(self, pool: PoolConfig, context: int) -> float:
        """A decode step's seconds in ``pool``: as its replicas measure it, else as the planner predicts it."""
        if measured := self.decoding(pool):
            return statistics.fmean(x.step_s for x in measured)
        return decode_step_time(self.shape, self.hardware[pool.name], pool.devices, [context])

    def cached_tokens(self, pool: PoolConfig, n: int, hashes: Sequence[int]) -> int:
        """Prompt tokens ``pool`` probably holds in its prefix cache: the leading blocks of ``hashes`` this ingress
        sent there, remembered up to as many blocks as the pool's replicas report holding (LRU); the engine always
        computes at least the prompt's last token."""
        front = self.loads(pool.name)
        index = self.prefixes[pool.name]
        index.resize(sum(x.total_blocks for x in front) if front else POOL_PREFIX_BLOCKS)
        bs = pool.block_size
        return min(index.matched(pool.name, hashes) * bs, (n - 1) // bs * bs)

    def predicted_ttft(self, pool: PoolConfig, n: int, strategy: str, available: list[str],
                       cached: int = 0) -> tuple[float, float] | None:
        """(seconds to this request's first token, of which waiting): its ``n - cached`` uncached tokens, attending
        to the ``cached`` prefix, prefill in one batch with the prompts ahead (the engine batches waiting prompts),
        after a slot frees. ``strategy``: ``auto`` or one of ``available`` (what the pool built at start). None: it
        cannot run this prompt in the pool's memory."""
        queued, slot_wait = self.backlog(pool)
        shape, hardware, new = self.shape, self.hardware[pool.name], n - cached
        try:
            alone = plan_prefill(shape, hardware, pool.devices, new, available=available, cached=cached)
            own = alone.predicted_s.get(alone.strategy if strategy == "auto" else strategy)
            if own is None:
                return None
            batched = (plan_prefill(shape, hardware, pool.devices, [new, queued], available=available,
                                    cached=[cached, 0]) if queued else alone)
        except ValueError:  # nothing the pool offers fits its memory for this prompt (or this batch)
            return None
        wait = max(0.0, batched.time_s - alone.time_s) + slot_wait
        return own + wait, wait

    async def pick_pool(self, prompt: Sequence[int] | int, max_tokens: int, pool: str | None = None,
                        strategy: str = "auto", avoid: frozenset[str] = frozenset()) -> Route:
        """The pool predicted to finish the request first (first token, then ``max_tokens`` decode steps; ``pool``:
        only that one), among those whose expected wait is within ``max_queue_wait_s``; none: ``Overloaded`` (503),
        at once. Pools in ``avoid`` and pools whose replicas all failed are skipped (none left: ``EngineFailed``,
        503). While the app drains before it stops: ``ShuttingDown`` (503). ``prompt``: its token ids, or only
        their count (then no pool is credited with its prefix)."""
        n = prompt if isinstance(prompt, int) else len(prompt)
        chains: dict[int, list[int]] = {}  # block size -> the prompt's hash chain
        if pool is not None and pool not in self.queued:
            raise RequestError(f"unknown pool {pool!r}: choose one of {', '.join(self.queued)}")
        strategy = check_strategy(strategy, allow_auto=True, error=RequestError)
        self.watch_board()
        if self.draining:
            raise ShuttingDown("this server is shutting down: it finishes the requests it holds and takes no new ones; "
                             "retry against another server")
        pools = [p for p in self.cfg.pools if pool in (None, p.name)]
        limit = {p.name: p.context(self.shape.max_position_embeddings) for p in pools}
        fits = [p for p in pools if n + max_tokens <= limit[p.name]]
        if not fits:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                               f"context limit of every pool ({max(limit.values())} tokens at most)")
        routes, waits, down = [], [], []
        unbuilt: dict[str, list[str]] = {}  # pools that did not build the requested layout: what they run
        no_memory: list[str] = []  # pools whose memory cannot prefill this prompt (by it)
        pinned = strategy != "auto"
        candidates = [p for p in fits if self.warmed(p)] or fits  # a pool still starting: only if no other fits
        for p in candidates:
            if p.name in avoid or not self.serving(p):
                down.append(p.name)
                continue
            available = await self.available(p.name)
            if pinned and strategy not in available:  # built at start or never: a step builds nothing
                unbuilt[p.name] = available
                continue
            if self.queued[p.name] + n > p.max_queued_tokens:
                continue
            hashes = None
            if not isinstance(prompt, int):
                if p.block_size not in chains:
                    chains[p.block_size] = prefix_hashes(prompt, p.block_size)
                hashes = chains[p.block_size]
            cached = self.cached_tokens(p, n, hashes) if hashes else 0
            predicted = self.predicted_ttft(p, n, strategy, available, cached)
            if predicted is None:
                no_memory.append(p.name)
                continue
            ttft, wait = predicted
            set_expected_wait(p.name, wait)
            if wait > self.cfg.max_queue_wait_s:
                waits.append(wait)
                continue
            # the whole request: a pool that prefills sooner but decodes slower (ranks sharing a core) loses
            decode = (max_tokens - 1) * self.decode_step_s(p, n + max_tokens // 2)
            routes.append(Route(pool=p, predicted_s=ttft + decode, ttft_s=ttft, cached_tokens=cached, hashes=hashes))
        if not routes:
            if not [p for p in fits if p.name not in unbuilt and p.name not in no_memory
                    and (not pinned or strategy in self._available.get(p.name, [strategy]))]:
                why = [*(f"pool {name} did not build it at start (it runs {', '.join(map(repr, runs))})"
                         for name, runs in unbuilt.items()),
                       *(f"pool {name} lacks the memory to prefill {n} tokens" + (" this way" if pinned else "")
                         for name in no_memory)]
                raise RequestError((f"prefill strategy {strategy!r} cannot" if pinned else "no prefill strategy can")
                                   + f" run this request in any pool whose context holds it: {'; '.join(why)}"
                                   + ("; name one of those, or none to let the planner choose" if unbuilt else ""))
            if waits:
                least = min(waits)
                raise Overloaded(f"every pool that can serve this request would queue it for longer than this "
                                 f"server's max_queue_wait_s of {self.cfg.max_queue_wait_s:g} s (at least "
                                 f"{least:.1f} s now); retry later", retry_after_s=least - self.cfg.max_queue_wait_s)
            if len(down) == len(candidates):
                raise EngineFailed(f"the replicas of pool {', '.join(down)} failed; Serve is replacing them")
            raise Overloaded("every pool that can serve this request is at its queued-token limit; retry later")
        return min(routes, key=lambda r: r.predicted_s)  # min keeps the first of equals: config order

    # -- running -----------------------------------------------------------------------------------------------------

    async def start(self, prompt_ids: list[int], params: SamplingParams, pool: str | None, strategy: str,
                    whole: bool = False, timeout_s: float | None = None
                    ) -> tuple[Route, int, Update, AsyncIterator[Update]]:
        """Pick a pool and run the request up to its first update (with ``whole``: its whole answer); returns (the
        route, the retries it took, the first update, the rest). A replica failure before the first update starts
        the request again elsewhere (at most ``max_retries`` times), the failed replica (or a pool left without
        replicas) skipped; the last failure is raised when no other place is left. ``timeout_s`` bounds the whole
        request, retries included."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        avoid: set[str] = set()
        failure: BaseException | None = None
        for retries in range(self.cfg.max_retries + 1):
            try:
                route = await self.pick_pool(prompt_ids, params.max_tokens, pool, strategy, frozenset(avoid))
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
                if not self.replica_failed(e):
                    raise
                failure = e
                if retries < self.cfg.max_retries:
                    record_retry(route.pool.name)
                    logger.warning("a request's replica in pool %s failed before its first token; starting it again "
                                   "(retry %d of %d): %s", route.pool.name, retries + 1, self.cfg.max_retries,
                                   str(cause_of(e)).splitlines()[0][:200])
                if not getattr(cause_of(e), "replica", None) and len(self.loads(route.pool.name)) < 2:
                    avoid.add(route.pool.name)  # a replica not named (its actor died): go where another one runs
        raise failure

    @staticmethod
    def replica_failed(e: BaseException) -> bool:
        """Whether ``e`` says the request's replica failed, so that starting it again elsewhere is right; a replica
        whose engine failed is skipped from now on (a dead actor is dropped by Serve's router itself)."""
        from ray.exceptions import RayActorError

        cause = cause_of(e)
        if isinstance(cause, EngineFailed):
            FAILED.add(cause.replica)
        return isinstance(cause, (EngineFailed, RayActorError))

    async def run(self, route: Route, prompt_ids: list[int], params: SamplingParams, strategy: str = "auto",
                  whole: bool = False) -> AsyncIterator[Update]:
        """Updates of the request on ``route``'s pool; the first arrives after prefill (strategy known), or with
        ``whole`` the answer arrives as one update (non-streaming: one message per hop instead of one per step).
        Its prompt tokens count as queued on the pool until its first update; leaving early cancels the call. The
        pool is taken to hold the prompt's prefix from now on (``cached_tokens``)."""
        name, n = route.pool.name, len(prompt_ids)
        hashes = route.hashes if route.hashes is not None else prefix_hashes(prompt_ids, route.pool.block_size)
        self.prefixes[name].record(name, hashes)
        handles = self.handles[name]
        run = self._run_aggregated if handles.engine is not None else self._run_disaggregated
        rid, progress = next(self._ids), [params.max_tokens, 0]
        self.queued[name] += n
        self.inflight[name][rid] = progress
        prefilled = False
        try:
            async with aclosing(run(handles, prompt_ids, params.model_dump(), strategy, whole)) as updates:
                async for update in updates:
                    if not prefilled:
                        self.queued[name] -= n
                        prefilled = True
                    progress[1] += len(update.token_ids)
                    yield update
        except Exception as e:
            self.replica_failed(e)  # stop routing to a failed replica now, not at its health check
            raise
        finally:
            del self.inflight[name][rid]
            if not prefilled:
                self.queued[name] -= n

    @staticmethod
    async def _run_aggregated(handles: PoolHandles, prompt_ids: list[int], params: dict, strategy: str,
                              whole: bool) -> AsyncIterator[Update]:
        """One engine replica prefills and decodes."""
        if whole:
            yield await cancelled_with_caller(handles.engine.generate_whole.remote(prompt_ids, params, strategy))
            return
        call = handles.engine.options(stream=True).generate.remote(prompt_ids, params, strategy)
        async with aclosing(until_finished(call)) as updates:
            async for update in updates:
                yield update

    @staticmethod
    async def _run_disaggregated(handles: PoolHandles, prompt_ids: list[int], params: dict, strategy: str,
                                 whole: bool) -> AsyncIterator[Update]:
        """A prefill replica runs the prompt to its first token and leaves its K/V in the object store; a decode
        replica takes it over rank to rank and finishes the request."""
        first: Update = await cancelled_with_caller(handles.prefill.prefill.remote(prompt_ids, params, strategy))
        handoff: Handoff | None = first.handoff
        first.handoff = None
        if handoff is None or params["max_tokens"] == 1 or first.finish_reason != "length":
            yield first
            return
        # The decode replica re-emits the first token with its text; report only the prefill's figures here.
        figures = Update(text="", token_ids=[], finish_reason=None, prompt_tokens=len(prompt_ids),
                         completion_tokens=0, prefill_strategy=first.prefill_strategy, prefill_s=first.prefill_s,
                         ttft_s=first.ttft_s, tpot_s=None)
        if whole:
            rest = await cancelled_with_caller(handles.decode.decode_whole.remote(handoff, params))
            yield merge_updates([figures, rest])
            return
        yield figures
        call = handles.decode.options(stream=True).decode.remote(handoff, params)
        async with aclosing(until_finished(call)) as updates:
            async for update in updates:
                yield update
