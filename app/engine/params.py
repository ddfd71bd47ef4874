"""What a request may ask of generation: ``SamplingParams`` and the range of each field, validated at the edge.

A leaf without torch (like ``messages.py``): the ingress validates requests with it and never loads torch, which
would cost each ingress process seconds of CPU at start and a few hundred MB of memory for nothing it computes.
``sampling.py`` applies the parameters to logits.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from app.engine.messages import RequestError

# The range of every sampling field, in one place: the API bodies (app/api.py) use the same types, so an HTTP, gRPC
# or CLI request is held to the same limits and the error names the field and the bound it broke.
# No fixed ceiling on max_tokens: a server's own max_tokens_limit (the ingress) and context (router and engine) cap it.
MaxTokens = Annotated[int, Field(ge=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]  # alternatives reported per position (OpenAI's 0..20)
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=-1, le=1000)]  # 0 or -1 (vLLM's "off"): no limit
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM does)
Stop = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # OpenAI's presence / frequency penalty
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)]  # 1: none
MinP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
MinTokens = Annotated[int, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0)]  # and below the vocabulary size: checked where it is known (``check_vocab``)
LogitBias = Annotated[dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]],
                      Field(max_length=1024)]
StopTokenIds = Annotated[list[TokenId], Field(max_length=256)]


class SamplingParams(BaseModel):
    """What a request may ask of generation. temperature 0 is greedy."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: Annotated[int, Field(ge=0)] = 16  # 0: the prompt only (scored with ``prompt_logprobs``)
    temperature: Temperature = 0.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stop = Field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    logit_bias: LogitBias = Field(default_factory=dict)
    min_p: MinP = 0.0
    min_tokens: MinTokens = 0  # EOS and ``stop_token_ids`` cannot be sampled before this many output tokens
    stop_token_ids: StopTokenIds = Field(default_factory=list)  # also end the sequence ("stop"), as EOS does
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # the stop string (or stop token's text) ends the text
    logprobs: TopLogprobs | None = None  # each generated token's log-prob and this many alternatives (None: none)
    prompt_logprobs: TopLogprobs | None = None  # each prompt token's likewise (every prompt position's logits)
    _max_tokens_default: bool = PrivateAttr(False)  # max_tokens was not asked for: the ingress may lower it to fit

    @property
    def max_tokens_default(self) -> bool:
        """Whether ``max_tokens`` is the endpoint's default rather than the client's (the ingress lowers a default to
        what the server's limit and context leave; never a value the client sent)."""
        return self._max_tokens_default

    @property
    def greedy(self) -> bool:
        """temperature 0, or one so small that dividing logits by it overflows (found by the API fuzzer: 1e-300
        made every probability NaN); such a temperature is greedy in effect anyway."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether any logit processor applies (else a greedy row is the plain argmax)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids of ``logit_bias`` and ``stop_token_ids`` must be in the vocabulary: a 400 naming the field."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise RequestError(f"{name}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                                   param=name)
