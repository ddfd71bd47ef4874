"""What crosses between the engine and the Serve application: request errors, engine failures, updates, handoffs.

A leaf module (it imports nothing of dynpart), so the front end can name these types without importing the engine's
internals, and the engine can raise them without knowing who listens.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class RequestError(ValueError):
    """The request cannot be served as asked (too long, bad strategy); the message names the limit."""


class EngineFailed(RuntimeError):
    """The engine thread stopped (a step raised, e.g. a shard worker died): the request cannot finish here."""


class Handoff(BaseModel):
    """What a decode replica needs to continue a prefilled sequence (disaggregated serving)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt_ids: list[int]
    first_token: int
    kv_refs: list[list]  # [rank][0]: that rank's K/V slice in the object store


@dataclass
class Update:
    """What one step produced for one sequence: new text and tokens, and once known, the request's figures."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    prefill_strategy: str | None
    prefill_s: float
    ttft_s: float | None
    tpot_s: float | None
    handoff: Handoff | None = None  # prefill-only engines: per-rank K/V references for the decode replica
