"""OpenAI-compatible request and response bodies (the subset dynpart serves), validated at the edge.

Requests forbid unknown fields, so a typo is a clear 400 rather than a silently ignored option. Fields OpenAI clients
commonly send are accepted when they ask for nothing dynpart cannot do (``n`` = 1, no logprobs, zero penalties).
Extensions: ``top_k``, ``ignore_eos``. Every response's ``usage`` carries a ``dynpart`` object. Sampling fields
share their ranges with ``SamplingParams``; a server's own caps (``max_tokens_limit``, context, vocabulary) are
checked by the ingress and router, which know them. A ``max_tokens`` the client did not send is the endpoint's
default, lowered by the ingress to what the limit and the context leave for the prompt.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.messages import RequestError
from app.engine.sampling import MaxTokens, SamplingParams, Seed, Stop, Temperature, TopK, TopP

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions (and gRPC's when max_tokens is 0)
CHAT_MAX_TOKENS = 256
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class DynpartUsage(BaseModel):
    pool: str
    strategy: str | None
    prefill_ms: float
    ttft_ms: float | None
    tpot_ms: float | None
    devices: int
    cached_tokens: int = 0  # prompt tokens served from the replica's prefix cache
    retries: int = 0  # times it was started again elsewhere because its replica failed before its first token


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    dynpart: DynpartUsage


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


def sampling_params(default_max_tokens: int, max_tokens: int | None, stop: str | list[str] | None,
                    **fields: Any) -> SamplingParams:
    """The one mapping from a request's fields (an HTTP body or a gRPC message) to the engine's ``SamplingParams``:
    no ``max_tokens`` (None, or gRPC's 0) means the endpoint's default (marked so: ``max_tokens_default``), one ``stop``
    string means a list of one."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    params = SamplingParams(max_tokens=max_tokens or default_max_tokens, stop=stop, **fields)
    params._max_tokens_default = not max_tokens
    return params


def check_max_tokens(value: int | None, limit: int, field: str = "max_tokens") -> None:
    """A ``max_tokens`` (or the chat's ``max_completion_tokens``: ``field``) past the server's ``max_tokens_limit``
    is the client's mistake, named; the request model itself sets no ceiling, so the configured limit is the one."""
    if value is not None and value > limit:
        raise RequestError(f"{field} ({value}) exceeds this server's limit of {limit} generated tokens per request",
                           param=field)


class GenerationRequest(BaseModel):
    """What completions and chat requests share: the model and the sampling fields."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0  # OpenAI's default; 0 is greedy
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    stop: Annotated[str, Field(min_length=1, max_length=64)] | Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: Literal[1] = 1
    user: str | None = Field(None, max_length=256)
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return sampling_params(default_max_tokens, self.max_tokens, self.stop, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, seed=self.seed, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    prompt: Annotated[str, Field(min_length=1)] | TokenIds  # token ids are checked against the vocabulary later
    logprobs: None = None
    echo: Literal[False] = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _not_empty(cls, v):
        if v == "" or v == []:
            raise ValueError("prompt is empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] = Field(max_length=1024)

    def text(self) -> str:
        """Text content; a list of parts may hold only text parts."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise RequestError(f"message content of type {part.get('type')!r} is not supported (text only)",
                                   param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: Literal[False] | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid: str, model: str, text: str, finish: str | None, usage: Usage | None, chat: bool) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage.model_dump() if usage else None}


def chunk_body(rid: str, model: str, text: str | None, finish: str | None, chat: bool, role: bool = False,
               usage: Usage | None = None) -> dict:
    """One SSE chunk; ``text=None`` with ``usage`` is the final usage-only chunk (``choices`` empty)."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        if chat:
            delta: dict[str, Any] = {"content": text}
            if role:
                delta["role"] = "assistant"
            choices.append({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None})
        else:
            choices.append({"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


class ErrorDetail(BaseModel):
    """OpenAI's error object: what is wrong (naming the field and its limit), its type, the field, a code."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer, and of a stream's in-band error event."""

    error: ErrorDetail


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()
