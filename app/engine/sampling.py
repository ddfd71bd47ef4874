"""Sampling parameters (validated at the edge) and next-token selection from full logits."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

# The range of every sampling field, in one place: the API bodies (app/api.py) use the same types, so an HTTP, gRPC
# or CLI request is held to the same limits and the error names the field and the bound it broke.
# No fixed ceiling on max_tokens: a server's own max_tokens_limit (the ingress) and context (router and engine) cap it.
MaxTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=1000)]  # 0: no limit
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM does)
Stop = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)]


class SamplingParams(BaseModel):
    """What a request may ask of generation. temperature 0 is greedy."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: MaxTokens = 16
    temperature: Temperature = 0.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stop = Field(default_factory=list)
    ignore_eos: bool = False
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


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V]: argmax, or temperature / top-k / top-p sampling."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """Next tokens for a batch, logits [B, V]: what ``sample`` gives row by row, with every greedy row picked by one
    argmax over those rows (one kernel and one host transfer instead of one each per sequence). The others go
    through ``sample`` in row order, so seeded generators draw their random numbers exactly as before."""
    if logits.dim() != 2 or not logits.shape[0] == len(params) == len(generators):
        raise ValueError(f"logits {tuple(logits.shape)} for {len(params)} params and {len(generators)} generators")
    out = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[torch.tensor(greedy, device=logits.device)]
        for i, token in zip(greedy, torch.argmax(rows, dim=-1).tolist()):
            out[i] = token
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample(logits[i], p, generators[i])
    return out
