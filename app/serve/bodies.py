"""The OpenAI response bodies dynpart answers with: usage, choices, whole completions, stream chunks and errors.

Apart from the request models (``api``) because the stream writer (``responses``) and the error table (``errors``)
build them too, and neither needs to know what a request may carry.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel


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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def choice_body(index: int, text: str, finish: str | None, chat: bool, logprobs: dict | None = None) -> dict:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return choice


def completion_body(rid: str, model: str, choices: list[dict], usage: Usage | None, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage.model_dump() if usage else None}


def chunk_body(rid: str, model: str, text: str | None, finish: str | None, chat: bool, role: bool = False,
               usage: Usage | None = None, logprobs: dict | None = None, index: int = 0) -> dict:
    """One SSE chunk of choice ``index`` (with its tokens' ``logprobs`` when asked); ``text=None`` with ``usage`` is
    the final usage-only chunk (``choices`` empty)."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        if chat:
            delta: dict[str, Any] = {"content": text}
            if role:
                delta["role"] = "assistant"
            choices.append({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs})
        else:
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
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
