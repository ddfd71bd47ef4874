"""How a routed request's updates become what its client reads: the accumulated ``Result``, its usage and headers, the
server-sent events of a stream, and the request's metrics once it ends; the same for HTTP and gRPC.

A stream's events follow OpenAI's: one ``data: {json}`` chunk per update that carries text (the first chunk of a
chat also the role), the chunk with ``finish_reason``, the usage-only chunk if asked for, ``data: [DONE]``. Its
headers are sent before its second update, so a failure after them cannot change the status: it ends the stream with
one in-band ``data: {"error": ...}`` event and then ``data: [DONE]``, as OpenAI does.

Log-probs (``Logprobs``) read as OpenAI's: completions' legacy ``tokens`` / ``token_logprobs`` / ``top_logprobs`` (a
dict of the top alternatives and the chosen token) / ``text_offset``, with ``echo`` the prompt's tokens first (the
first one null); chat's ``content`` list of ``{token, logprob, bytes, top_logprobs}``. A streamed chunk carries its
own tokens'. Token strings are each token decoded alone, and ``bytes`` their UTF-8, as vLLM reports them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from app.engine.messages import TokenLogprob, Update
from app.serve.api import DynpartUsage, GenerationRequest, Usage, chunk_body, error_body
from app.serve.errors import api_error
from app.serve.metrics import record_request


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
    """Count the request in the metrics, with its figures, as it ended (``status``: HTTP's, also for gRPC)."""
    record_request(r.pool, r.strategy, status, r.ttft_s, r.tpot_s, r.prefill_s)


def usage_of(r: Result) -> Usage:
    ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
    return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=len(r.token_ids),
                 total_tokens=r.prompt_tokens + len(r.token_ids),
                 dynpart=DynpartUsage(pool=r.pool, strategy=r.strategy, prefill_ms=ms(r.prefill_s) or 0.0,
                                      ttft_ms=ms(r.ttft_s), tpot_ms=ms(r.tpot_s), devices=r.devices,
                                      cached_tokens=r.cached_tokens, retries=r.retries))


def headers_of(r: Result) -> dict[str, str]:
    return {"x-dynpart-pool": r.pool, "x-dynpart-strategy": r.strategy or "none",
            "x-dynpart-prefill-ms": f"{r.prefill_s * 1e3:.3f}", "x-dynpart-retries": str(r.retries)}


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body iterator however the response ends. A client that leaves
    cancels the response's task, mostly while the iterator waits at a ``yield``; Starlette then leaves the iterator to
    the garbage collector, and the generation behind it would run on until then (a stream's whole length)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def sse(rid: str, body: GenerationRequest, result: Result, first: Update, rest: AsyncIterator[Update],
              chat: bool, logprobs: Logprobs | None = None, echo: str = "") -> AsyncIterator[str]:
    """The stream's events from its first update on (the first also carries the ``echo``ed prompt and, with
    ``logprobs``, its tokens'); closing it early (the client left) cancels the generation."""
    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    role = chat
    update: Update | None = first
    try:
        while update is not None:
            entries = [*(update.prompt_logprobs or []), *(update.logprobs or [])] if logprobs else []
            text, echo = echo + update.text, ""
            if text or update.finish_reason or role or entries:
                yield event(chunk_body(rid, body.model, text, update.finish_reason, chat, role=role,
                                       logprobs=logprobs.body(entries) if logprobs else None))
                role = False
            update = await anext(rest, None)
            if update is not None:
                result.add(update)
    except Exception as e:  # headers are gone: report in-band, as OpenAI does, then end the stream as usual
        err = api_error(e)
        done(result, str(err.status))
        yield event(error_body(err.message, err.kind, err.code))
        yield "data: [DONE]\n\n"
        return
    finally:  # closed early (the client left: ClosingStreamingResponse closes this): cancel the generation now
        await rest.aclose()
    done(result)
    if body.include_usage:
        yield event(chunk_body(rid, body.model, None, None, chat, usage=usage_of(result)))
    yield "data: [DONE]\n\n"
