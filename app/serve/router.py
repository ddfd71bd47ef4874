"""Pick a pool for a tokenized request and run it there; shared by the HTTP and the gRPC front ends.

Picking a pool asks the planner, per pool that can hold the request (prompt + max_tokens within its context), for
the predicted prefill time of this prompt on that pool's devices, plus the predicted time to clear the prompt tokens
the ingress has already sent there and that are still waiting for their first token; the lowest sum wins (ties go
to the pool listed first). A pool whose waiting tokens would pass ``max_queued_tokens`` is skipped; if every pool is
skipped the request is refused as overloaded (503). A request's generation is cancelled in its replica whenever its
caller stops listening: a client gone, or the app's request timeout (``with_deadline``) passed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from app.engine.messages import Handoff, RequestError, Update
from app.engine.sampling import SamplingParams
from app.serve.config import AppConfig, PoolConfig
from app.serve.errors import Overloaded, RequestTimeout
from strategies.cost import get_hardware, plan_prefill
from strategies.layout import check_strategy
from strategies.loader import Checkpoint


async def with_deadline(updates: AsyncIterator[Update], timeout_s: float | None) -> AsyncIterator[Update]:
    """``updates`` until ``timeout_s`` from now (None: no limit); then ``RequestTimeout``, and closing ``updates``
    cancels the generation in its replica (``Router.run``) so it frees its KV slot."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                update = await asyncio.wait_for(anext(updates), left)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeout(f"the request ran past this server's request_timeout_s of {timeout_s:g} s; "
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
    predicted_s: float  # predicted time to first token, queue included


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
    ttft_s: float | None = None  # measured here: from arrival at the ingress to the first update
    tpot_s: float | None = None
    started: float = field(default_factory=time.perf_counter)

    def add(self, u: Update) -> None:
        self.text += u.text
        self.token_ids += u.token_ids
        self.finish_reason = u.finish_reason
        self.prompt_tokens = u.prompt_tokens
        self.strategy = self.strategy or u.prefill_strategy
        self.prefill_s = self.prefill_s or u.prefill_s
        self.ttft_s = self.ttft_s if self.ttft_s is not None else time.perf_counter() - self.started
        self.tpot_s = u.tpot_s if u.tpot_s is not None else self.tpot_s


class Router:
    def __init__(self, cfg: AppConfig, handles: dict[str, PoolHandles]):
        self.cfg, self.handles = cfg, handles
        ckpt = Checkpoint(cfg.model)
        self.tokenizer, self.shape = ckpt.tokenizer(), ckpt.shape
        self.hardware = {p.name: get_hardware(p.hardware) for p in cfg.pools}
        self.queued = {p.name: 0 for p in cfg.pools}
        self._available: dict[str, list[str]] = {}

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

    async def pick_pool(self, n: int, max_tokens: int, pool: str | None = None, strategy: str = "auto") -> Route:
        """The pool with the lowest predicted time to first token for ``n`` prompt tokens (``pool``: only that one)."""
        if pool is not None and pool not in self.queued:
            raise RequestError(f"unknown pool {pool!r}: choose one of {', '.join(self.queued)}")
        check_strategy(strategy, allow_auto=True, error=RequestError)
        pools = [p for p in self.cfg.pools if pool in (None, p.name)]
        limit = {p.name: min(p.max_model_len, self.shape.max_position_embeddings) for p in pools}
        fits = [p for p in pools if n + max_tokens <= limit[p.name]]
        if not fits:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                               f"context limit of every pool ({max(limit.values())} tokens at most)")
        routes = []
        for p in fits:
            if self.queued[p.name] + n > p.max_queued_tokens:
                continue
            available = await self.available(p.name)
            plan = plan_prefill(self.shape, self.hardware[p.name], p.devices, n, available=available)
            chosen = plan.strategy if strategy == "auto" else strategy
            own = plan.predicted_s.get(chosen)
            if own is None:
                continue
            wait = self.queued[p.name] and plan_prefill(self.shape, self.hardware[p.name], p.devices,
                                                        self.queued[p.name], available=available).time_s
            routes.append(Route(pool=p, predicted_s=own + wait))
        if not routes:
            raise Overloaded("every pool that can serve this request is at its queued-token limit; retry later")
        return min(routes, key=lambda r: r.predicted_s)  # min keeps the first of equals: config order

    # -- running -----------------------------------------------------------------------------------------------------

    async def run(self, route: Route, prompt_ids: list[int], params: SamplingParams,
                  strategy: str = "auto") -> AsyncIterator[Update]:
        """Updates of the request on ``route``'s pool; the first arrives after prefill (strategy known). Its prompt
        tokens count as queued on the pool until then; leaving early cancels the call in flight."""
        name, n = route.pool.name, len(prompt_ids)
        handles = self.handles[name]
        run = self._run_aggregated if handles.engine is not None else self._run_disaggregated
        self.queued[name] += n
        prefilled = False
        try:
            async with aclosing(run(handles, prompt_ids, params, strategy)) as updates:  # closing it cancels the call
                async for update in updates:
                    if not prefilled:
                        self.queued[name] -= n
                        prefilled = True
                    yield update
        finally:
            if not prefilled:
                self.queued[name] -= n

    @staticmethod
    async def _run_aggregated(handles: PoolHandles, prompt_ids: list[int], params: SamplingParams,
                              strategy: str) -> AsyncIterator[Update]:
        """One engine replica prefills and decodes."""
        call = handles.engine.options(stream=True).generate.remote(prompt_ids, params.model_dump(), strategy)
        async with aclosing(until_finished(call)) as updates:
            async for update in updates:
                yield update

    @staticmethod
    async def _run_disaggregated(handles: PoolHandles, prompt_ids: list[int], params: SamplingParams,
                                 strategy: str) -> AsyncIterator[Update]:
        """A prefill replica runs the prompt to its first token and leaves its K/V in the object store; a decode
        replica takes it over rank to rank and streams the rest."""
        prefill = handles.prefill.prefill.remote(prompt_ids, params.model_dump(), strategy)
        try:
            first: Update = await prefill
        except BaseException:
            prefill.cancel()
            raise
        handoff: Handoff | None = first.handoff
        first.handoff = None
        if handoff is None or params.max_tokens == 1 or first.finish_reason != "length":
            yield first
            return
        # The decode replica re-emits the first token with its text; report only the prefill's figures here.
        yield Update(text="", token_ids=[], finish_reason=None, prompt_tokens=len(prompt_ids), completion_tokens=0,
                     prefill_strategy=first.prefill_strategy, prefill_s=first.prefill_s, ttft_s=first.ttft_s,
                     tpot_s=None)
        call = handles.decode.options(stream=True).decode.remote(handoff, params.model_dump())
        async with aclosing(until_finished(call)) as updates:
            async for update in updates:
                yield update
