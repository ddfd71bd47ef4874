"""Classify a tokenized request onto a pool and run it there; shared by the HTTP and the gRPC front ends.

Classification asks the planner, per pool that can hold the request (prompt + max_tokens within its context), for
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
from dataclasses import dataclass, field

from app.disagg import Handoff
from app.engine import RequestError
from app.engine_loop import Update
from app.pools import AppConfig, PoolConfig
from app.sampling import SamplingParams
from strategies.cost import get_hardware, plan_prefill
from strategies.runner import check_strategy
from strategies.loader import Checkpoint


class Overloaded(RuntimeError):
    """Every pool that could serve the request is full: answer 503."""


class RequestTimeout(TimeoutError):
    """The request ran past the app's ``request_timeout_s``; its generation was cancelled."""


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
    strategy: str  # predicted prefill strategy
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

    # -- classification ----------------------------------------------------------------------------------------------

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

    async def classify(self, n: int, max_tokens: int, pool: str | None = None, strategy: str = "auto") -> Route:
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
            routes.append(Route(pool=p, strategy=chosen, predicted_s=own + wait))
        if not routes:
            raise Overloaded("every pool that can serve this request is at its queued-token limit; retry later")
        return min(routes, key=lambda r: r.predicted_s)  # min keeps the first of equals: config order

    # -- running -----------------------------------------------------------------------------------------------------

    async def run(self, route: Route, prompt_ids: list[int], params: SamplingParams,
                  strategy: str = "auto") -> AsyncIterator[Update]:
        """Updates of the request on ``route``'s pool; the first arrives after prefill (strategy known)."""
        name, n = route.pool.name, len(prompt_ids)
        handles = self.handles[name]
        self.queued[name] += n
        waiting, finished = True, False
        call = None  # the Serve call in flight: cancelled if the caller leaves before the request finished
        try:
            if handles.engine is not None:
                call = handles.engine.options(stream=True).generate.remote(prompt_ids, params.model_dump(), strategy)
                async for update in call:
                    if waiting:
                        self.queued[name] -= n
                        waiting = False
                    finished = update.finish_reason is not None
                    yield update
                return
            call = handles.prefill.prefill.remote(prompt_ids, params.model_dump(), strategy)
            first: Update = await call
            self.queued[name] -= n
            waiting, finished = False, True
            handoff: Handoff | None = first.handoff
            if handoff is None or params.max_tokens == 1 or first.finish_reason != "length":
                first.handoff = None
                yield first
                return
            finished = False
            # The decode replica re-emits the first token with its text; report only the prefill's figures here.
            yield Update(text="", token_ids=[], finish_reason=None, prompt_tokens=n, completion_tokens=0,
                         prefill_strategy=first.prefill_strategy, prefill_s=first.prefill_s, ttft_s=first.ttft_s,
                         tpot_s=None)
            call = handles.decode.options(stream=True).decode.remote(handoff, params.model_dump())
            async for update in call:
                finished = update.finish_reason is not None
                yield update
        finally:
            if waiting:
                self.queued[name] -= n
            if call is not None and not finished:
                call.cancel()
