"""One request as the engine holds it: its tokens, how many have K/V in the cache, its text, and its figures.

A sequence is just its tokens (``all_ids``: prompt then output) and how many of them have K/V in the cache
(``num_computed``): prefill, decode, a prefix-cache hit and a recompute after preemption are all "compute the rest",
so the scheduler needs no state machine beyond ``remaining``. Three parties write it, each its own fields: the
scheduler (``num_computed``, ``blocks``, ``hashes``, ``cached_tokens``, ``preemptions``), the output processor
(tokens, ``text``, ``finish_reason``) and the engine (the strategy figures). The loop and the Serve replicas read it
only through ``take_delta`` and the figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from app.engine.detokenize import IncrementalDetokenizer
from app.engine.messages import Handoff, TokenLogprob
from app.engine.params import SamplingParams


@dataclass(eq=False)  # identity: ``seq in scheduler.running`` must not compare every field
class Sequence:
    # -- the request
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    strategy: str  # requested: "auto" or a strategy name
    generator: torch.Generator | None = None  # its own, so a seeded request does not depend on its batch
    detokenizer: IncrementalDetokenizer | None = None
    # -- tokens and their KV blocks (the scheduler's)
    output_ids: list[int] = field(default_factory=list)
    all_ids: list[int] = field(default_factory=list)  # prompt then output: what the cache must hold
    num_computed: int = 0  # tokens of ``all_ids`` whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)  # block table
    hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks computed so far
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    preemptions: int = 0
    # -- text and the end (the output processor's)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already handed out as deltas
    finish_reason: str | None = None
    error: str | None = None  # why it failed, when ``finish_reason`` is "error"
    # -- log-probs, when asked (the engine's): one per output token; one per prompt token so far (the first: None)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    # -- figures
    strategy_tokens: dict[str, int] = field(default_factory=dict)  # prompt tokens prefilled per strategy
    prefill_strategy: str | None = None
    prefill_s: float = 0.0
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_last_token: float | None = None
    handoff: Handoff | None = None  # set by a prefill-only engine: where its K/V waits for the decode replica

    def __post_init__(self) -> None:
        self.all_ids = list(self.prompt_ids)
        if self.params.prompt_logprobs is not None and self.prompt_ids:
            self.prompt_logprobs = [TokenLogprob(self.prompt_ids[0], None)]  # nothing predicts the first token

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether prompt positions whose log-probs were asked for are still unscored: its chunks then bring back
        every position's logits, and it computes its prompt itself rather than take blocks from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        """Tokens to compute before the next token can be sampled (1 while decoding)."""
        return len(self.all_ids) - self.num_computed

    def waited_for_first_s(self, now: float) -> float | None:
        """Seconds since it arrived while its first token is still to come (None once it has one, e.g. a sequence
        recomputed after a preemption): what its TTFT deadline counts against."""
        return None if self.output_ids else now - self.t_arrival

    @property
    def tokens_left(self) -> int:
        """Tokens it may still generate (up to ``max_tokens``; EOS or a stop may end it sooner)."""
        return self.params.max_tokens - len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.remaining > 1

    def finish(self, reason: str, error: str | None = None) -> None:
        """Mark it ended; the scheduler frees its blocks (``Scheduler.finish``)."""
        self.finish_reason, self.error = reason, error

    def prefilled(self, strategy: str, tokens: int, took_s: float) -> None:
        """``tokens`` of its prompt ran by ``strategy`` in a step of ``took_s``: the strategy it reports is the one
        that prefilled most of it (chunks of one prompt may run by different ones)."""
        self.strategy_tokens[strategy] = self.strategy_tokens.get(strategy, 0) + tokens
        self.prefill_strategy = max(self.strategy_tokens, key=self.strategy_tokens.get)
        self.prefill_s += took_s

    def take_delta(self) -> str:
        """New text safe to hand out: held back while it could still be the start of a stop sequence."""
        hold = 0 if self.finished else max((len(s) for s in self.params.stop), default=1) - 1
        upto = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:upto], upto
        return delta

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first_token is None else self.t_first_token - self.t_arrival

    @property
    def tpot_s(self) -> float | None:
        n = len(self.output_ids)
        if n < 2 or self.t_first_token is None or self.t_last_token is None:
            return None
        return (self.t_last_token - self.t_first_token) / (n - 1)
