"""How a routed request's updates become what its client reads: the accumulated ``Result``, its usage and headers, the
server-sent events of a stream, and the request's metrics once it ends; the same for HTTP and gRPC.

A stream's events follow OpenAI's: one ``data: {json}`` chunk per update that carries text (the first chunk of a
chat also the role; with ``continuous_usage_stats``, each its choice's usage so far), the chunk with
``finish_reason``, the usage-only chunk if asked for, ``data: [DONE]``. Its
headers are sent before its second update, so a failure after them cannot change the status: it ends the stream with
one in-band ``data: {"error": ...}`` event and then ``data: [DONE]``, as OpenAI does.

Log-probs (``Logprobs``) read as OpenAI's: completions' legacy ``tokens`` / ``token_logprobs`` / ``top_logprobs`` (a
dict of the top alternatives and the chosen token) / ``text_offset``, with ``echo`` the prompt's tokens first (the
first one null); chat's ``content`` list of ``{token, logprob, bytes, top_logprobs}``. A streamed chunk carries its
own tokens'. Token strings are each token decoded alone, and ``bytes`` their UTF-8, as vLLM reports them.

A request of several choices (a list of prompts, ``n``, ``best_of``) is several ``Run``s, one per sequence: started
together (``started_together``), finished together (``finished_together``) or streamed interleaved, each chunk tagged
with its choice's index (``interleaved``); one failing ends them all. ``best`` keeps a prompt's ``n`` most likely of
its ``best_of``; the usage sums the choices (each prompt's tokens once).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from app.engine.messages import TokenLogprob, Update
from app.serve.api import GenerationRequest
from app.serve.bodies import DynpartUsage, Usage, chunk_body, error_body
from app.serve.errors import api_error
from app.serve.metrics import record_request
from app.serve.pricing import Route


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
    route: Route | None = None  # how the router priced its pool (the predicted first and last token)
    learn: Callable[[Result], None] | None = None  # told of the request once it ended well (``Router.learn``)
    whole: bool = False  # the answer comes as one update (non-streaming): its TTFT is the engine's own
    started: float = field(default_factory=time.perf_counter)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the generated tokens, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # of the prompt's (echo with logprobs)

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
        self.logprobs += u.logprobs or []
        self.prompt_logprobs = self.prompt_logprobs or u.prompt_logprobs


@dataclass
class Run:
    """One sequence of a request under way: its result so far, its first update (prefill done), the rest."""

    result: Result
    first: Update
    rest: AsyncIterator[Update]


async def close_all(runs: list[Run]) -> None:
    for run in runs:
        await run.rest.aclose()  # cancels its generation in the replica


async def started_together(starts: list[Awaitable[list[Run]]]) -> list[Run]:
    """The runs of ``starts``, started concurrently, in order; if one fails to start, the others are closed (their
    generations cancelled) and its error raised."""
    outcomes = await asyncio.gather(*starts, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        await close_all([r for o in outcomes if not isinstance(o, BaseException) for r in o])
        raise failed[0]
    return [r for o in outcomes for r in o]


async def finished_together(runs: list[Run]) -> None:
    """Every run's remaining updates into its result, concurrently; the first failure cancels the others' generations
    and is raised."""
    async def finish(run: Run) -> None:
        async with aclosing(run.rest):
            async for update in run.rest:
                run.result.add(update)

    tasks = [asyncio.ensure_future(finish(r)) for r in runs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _next(updates: AsyncIterator[Update]) -> Update:
    return await anext(updates)


async def interleaved(runs: list[Run]) -> AsyncIterator[tuple[int, Update]]:
    """(choice index, update): every run's first update, then the rest's as each arrives (added to its result), one
    read in flight per run; a failure is raised, and leaving early closes every run."""
    reading: dict[asyncio.Future, int] = {}
    try:
        for i, run in enumerate(runs):
            yield i, run.first
        reading = {asyncio.ensure_future(_next(run.rest)): i for i, run in enumerate(runs)}
        while reading:
            ready, _ = await asyncio.wait(reading, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(ready, key=reading.get):
                i = reading.pop(task)
                try:
                    update = task.result()
                except StopAsyncIteration:
                    continue
                runs[i].result.add(update)
                yield i, update
                reading[asyncio.ensure_future(_next(runs[i].rest))] = i
    finally:
        for task in reading:
            task.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        await close_all(runs)


def cumulative_logprob(r: Result) -> float:
    """The sum of its generated tokens' log-probs (vLLM's ``cumulative_logprob``)."""
    return sum(e.logprob for e in r.logprobs if e.logprob is not None)


def best(runs: list[Run], n: int) -> list[Run]:
    """A prompt's ``n`` runs to return: all of them in order when it sampled ``n``; of ``best_of`` more, the ``n``
    with the highest cumulative log-prob, the most likely first (ties: in sampling order)."""
    return runs if len(runs) == n else sorted(runs, key=lambda r: -cumulative_logprob(r.result))[:n]


FLOOR = -9999.0  # JSON has no -inf (a token masked by min_tokens): the lowest log-prob reported, as vLLM's


def _finite(lp: float) -> float:
    return lp if lp > FLOOR else FLOOR  # NaN too


@dataclass
class Logprobs:
    """One answer's log-probs in OpenAI's shape: ``body`` of a run of positions (a whole answer's, or a chunk's:
    completions' ``text_offset`` goes on from the chunks before). ``text_of``: a token's text, decoded alone."""

    text_of: Callable[[int], str]
    chat: bool
    offset: int = 0  # characters of the tokens reported so far (completions' ``text_offset``)

    def body(self, entries: list[TokenLogprob]) -> dict:
        return self._chat(entries) if self.chat else self._completions(entries)

    def _completions(self, entries: list[TokenLogprob]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self.text_of(e.token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            top = None
            if e.logprob is not None:  # the alternatives, most likely first, and the chosen token (OpenAI's k + 1)
                top = {}
                for t, lp in [*e.top, (e.token, e.logprob)]:
                    top.setdefault(self.text_of(t), _finite(lp))
            out["token_logprobs"].append(None if e.logprob is None else _finite(e.logprob))
            out["top_logprobs"].append(top)
        return out

    def _chat(self, entries: list[TokenLogprob]) -> dict:
        def one(token: int, lp: float) -> dict:
            text = self.text_of(token)
            return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8", errors="replace"))}
        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries]}


def done(r: Result, status: str = "200") -> None:
    """Count the request in the metrics, with its figures, as it ended (``status``: HTTP's, also for gRPC), and tell
    the router what it took when it ended well."""
    record_request(r.pool, r.strategy, status, r.ttft_s, r.tpot_s, r.prefill_s)
    if status == "200" and r.learn is not None:
        r.learn(r)


def usage_of(r: Result | list[Result], prompt_tokens: int | None = None) -> Usage:
    """The usage of one result, or of a request's several (its choices): their completion and cached tokens and
    retries summed, ``prompt_tokens`` (each prompt counted once), the figures of the first."""
    results = r if isinstance(r, list) else [r]
    r = results[0]
    ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
    prompt = r.prompt_tokens if prompt_tokens is None else prompt_tokens
    completion = sum(len(x.token_ids) for x in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 dynpart=DynpartUsage(pool=r.pool, strategy=r.strategy, prefill_ms=ms(r.prefill_s) or 0.0,
                                      ttft_ms=ms(r.ttft_s), tpot_ms=ms(r.tpot_s), devices=r.devices,
                                      cached_tokens=sum(x.cached_tokens for x in results),
                                      retries=sum(x.retries for x in results)))


def headers_of(results: list[Result]) -> dict[str, str]:
    r = results[0]
    predicted = {} if r.route is None else {"x-dynpart-predicted-ttft-ms": f"{r.route.ttft_s * 1e3:.1f}",
                                            "x-dynpart-predicted-ms": f"{r.route.predicted_s * 1e3:.1f}"}
    return {"x-dynpart-pool": r.pool, "x-dynpart-strategy": r.strategy or "none",
            "x-dynpart-prefill-ms": f"{r.prefill_s * 1e3:.3f}",
            "x-dynpart-retries": str(sum(x.retries for x in results)), **predicted}


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body iterator however the response ends. A client that leaves
    cancels the response's task, mostly while the iterator waits at a ``yield``; Starlette then leaves the iterator to
    the garbage collector, and the generation behind it would run on until then (a stream's whole length)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def sse(rid: str, body: GenerationRequest, runs: list[Run], chat: bool, prompt_tokens: int,
              logprobs: list[Logprobs] | None = None, echoes: list[str] | None = None) -> AsyncIterator[str]:
    """The stream's events from the runs' first updates on, each chunk with its run's index (a run's first also
    carries its ``echoes``ed prompt and, with ``logprobs``, its tokens'); closing it early (the client left) cancels
    the generations."""
    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    roles = set(range(len(runs))) if chat else set()  # choices whose first chunk is still to come
    echoes = list(echoes or [""] * len(runs))
    updates = interleaved(runs)
    try:
        async for i, update in updates:
            lp = logprobs[i] if logprobs else None
            entries = [*(update.prompt_logprobs or []), *(update.logprobs or [])] if lp else []
            text, echoes[i] = echoes[i] + update.text, ""
            if text or update.finish_reason or i in roles or entries:
                yield event(chunk_body(rid, body.model, text, update.finish_reason, chat, role=i in roles,
                                       logprobs=lp.body(entries) if lp else None, index=i,
                                       usage=usage_of(runs[i].result) if body.continuous_usage else None))
                roles.discard(i)
    except Exception as e:  # headers are gone: report in-band, as OpenAI does, then end the stream as usual
        err = api_error(e)
        done(runs[0].result, str(err.status))
        yield event(error_body(err.message, err.kind, err.code))
        yield "data: [DONE]\n\n"
        return
    finally:  # closed early (the client left: ClosingStreamingResponse closes this): cancel the generations now
        await updates.aclose()
    done(runs[0].result)
    if body.include_usage:
        yield event(chunk_body(rid, body.model, None, None, chat,
                               usage=usage_of([r.result for r in runs], prompt_tokens)))
    yield "data: [DONE]\n\n"
