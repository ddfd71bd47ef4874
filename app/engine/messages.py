"""What crosses between the engine and the Serve application: request errors, engine failures, updates, handoffs.

A leaf module (it imports nothing of dynpart), so the front end can name these types without importing the engine's
internals, and the engine can raise them without knowing who listens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict


class RequestError(ValueError):
    """The client's mistake: the request cannot be served as asked (too long, bad strategy); the message names the
    limit, ``param`` the request field it is about (OpenAI's error ``param``) when there is one. Only this (and
    request validation) is a 4xx: any other exception is the server's fault, a 5xx."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # crosses processes with its field (Ray pickles it into a RayTaskError)
        return type(self), (str(self), self.param)


class SequenceFailed(RuntimeError):
    """One request's generation failed (its sampling or detokenization raised); the replica and the other requests in
    its batch go on."""


class EngineFailed(RuntimeError):
    """The engine thread stopped (a step raised, e.g. a shard worker died): the request cannot finish here.
    ``replica``: the Serve replica whose engine failed (the ingress stops routing to it and retries elsewhere)."""

    def __init__(self, message: str, replica: str = ""):
        super().__init__(message)
        self.replica = replica

    def __reduce__(self):  # crosses processes with its replica (Ray pickles it into a RayTaskError)
        return type(self), (str(self), self.replica)


@dataclass
class TokenLogprob:
    """One position's log-probabilities: the ``token`` there, its ``logprob`` (None: the prompt's first token, which
    nothing predicts) and the ``top`` alternatives as (token id, log-prob), most likely first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


class Handoff(BaseModel):
    """What a decode replica needs to continue a prefilled sequence (disaggregated serving)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt_ids: list[int]
    first_token: int
    kv_refs: list[list]  # [rank][0]: that rank's K/V slice in the object store
    first_logprob: TokenLogprob | None = None  # the first token's log-probs, when the request asked for them


@dataclass(frozen=True)
class EngineLoad:
    """How busy one engine replica is, and what a new request would wait there before its prefill starts.

    ``wait_s`` = the time to read the prompt tokens already waiting for prefill (the planner's, or beside decoding
    streams the step budget's pace: ``LLMEngine.prefill_wait_s``), plus, once the replica is full
    (``max_seqs`` sequences, or the waiting ones need more KV blocks than are free), the decode steps until room
    frees up: the tokens still to generate (running sequences' remaining ones and waiting sequences' ``max_tokens``)
    spread over ``max_seqs``, at the measured decode step time ``step_s``.
    """

    max_seqs: int
    running: int = 0
    waiting: int = 0
    waiting_prompt_tokens: int = 0
    decode_tokens_left: int = 0
    step_s: float = 0.0
    slot_wait_s: float = 0.0  # the decode part of ``wait_s``: 0 while sequences and KV blocks are to spare
    wait_s: float = 0.0
    # of ``wait_s``, what the step budget's pace adds to a lone prefill of the waiting prompts (0 with no stream
    # decoding): the router adds it to its own batched prefill of them
    paced_s: float = 0.0
    free_blocks: int = 0  # KV blocks nobody holds (prefix-cached ones included: they are evicted on demand)
    total_blocks: int = 0
    prefix_hit_rate: float = 0.0  # prompt tokens found in the prefix cache, of all looked up
    preemptions: int = 0  # sequences preempted (and recomputed) so far
    replica: str = ""  # the Serve replica reporting (set by its shell)
    actor: str = ""  # its Ray actor's id (hex): a call that dies with that actor names it (``RayActorError.actor_id``)
    failed: bool = False  # its engine stopped: routers skip it until Serve replaces it
    # the cost model's correction this replica learned from its steps (``cost.correction.CorrectionTable.entries``:
    # level key -> (median log ratio, steps)); the router prices the pool with it
    correction: dict[str, tuple[float, int]] = field(default_factory=dict)


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
    cached_tokens: int = 0  # prompt tokens found in the replica's prefix cache (not computed)
    logprobs: list[TokenLogprob] | None = None  # one per token of ``token_ids``, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token (the first update), when asked


def merge_updates(updates: list[Update]) -> Update:
    """Consecutive updates of one sequence as one: their text and tokens joined, the latest figures. A consumer
    slower than the engine then gets one message per turn, however many steps ran meanwhile."""
    last = updates[-1]
    if len(updates) == 1:
        return last
    return Update(text="".join(u.text for u in updates), token_ids=[t for u in updates for t in u.token_ids],
                  finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                  completion_tokens=last.completion_tokens,
                  prefill_strategy=next((u.prefill_strategy for u in updates if u.prefill_strategy), None),
                  prefill_s=next((u.prefill_s for u in updates if u.prefill_s), 0.0),
                  ttft_s=next((u.ttft_s for u in updates if u.ttft_s is not None), None), tpot_s=last.tpot_s,
                  handoff=last.handoff, cached_tokens=max(u.cached_tokens for u in updates),
                  logprobs=None if last.logprobs is None else [e for u in updates for e in u.logprobs or ()],
                  prompt_logprobs=next((u.prompt_logprobs for u in updates if u.prompt_logprobs), None))
