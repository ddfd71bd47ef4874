"""Sampling parameters (validated at the edge) and next-token selection from full logits, a step's rows together.

``sample_batch`` turns a step's logits [B, V] into B tokens with tensor operations over all rows at once, in vLLM's
order: ``min_tokens`` (EOS and stop token ids masked), ``logit_bias`` (added), ``repetition_penalty`` (vLLM's and
transformers' rule, over prompt and output tokens: a positive logit divided, a negative one multiplied),
``frequency_penalty`` / ``presence_penalty`` (OpenAI's rule, over output tokens: ``count * frequency + (count > 0) *
presence`` subtracted), then temperature, ``min_p``, ``top_k`` and ``top_p``. A greedy row takes the argmax of the
float32 logits after the penalties and bias (with none, exactly the argmax of the logits). A sampled row draws one
uniform number from its own generator (seeded per request, so a request's tokens do not depend on its batch) and
picks the token where its cumulative probability passes it: one draw per row, no loop over the vocabulary.

Log-probabilities (``logprobs``: of each generated token and its top alternatives; ``prompt_logprobs``: of each prompt
token) are ``log_softmax`` of float32 logits, the rows that asked together (``logprobs_of``). A generated token's are
those of the logits the sampler sees after the logit processors (``min_tokens``, ``logit_bias``, the penalties) but
before temperature, ``min_p``, ``top_k`` and ``top_p``: vLLM's default, and the model's own distribution whatever
the temperature. A prompt token's are the model's raw logits' (no processor applies to tokens not sampled), as vLLM's
``prompt_logprobs``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from app.engine.messages import TokenLogprob
from app.engine.params import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def logprobs_of(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Rows ``logits`` [R, V] as log-probabilities (``log_softmax`` in float32, all rows at once): per row the
    log-prob of ``tokens[r]`` and the ``top[r]`` most likely tokens with theirs (one ``topk`` of the largest ``top``
    for every row). The chosen token's value and the alternatives' come from the same tensor, so a greedy token's
    log-prob equals the first alternative's exactly."""
    if not len(tokens):
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(tokens), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
    k = min(max(top), lp.shape[-1])
    vals, alts = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    vals, alts = vals.tolist(), alts.tolist()
    return [TokenLogprob(t, c, list(zip(a[:n], v[:n])))
            for t, c, a, v, n in zip(tokens, chosen, alts, vals, top)]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           output_ids: Sequence[int] = (), prompt_ids: Sequence[int] = (), eos: Collection[int] = ()) -> int:
    """The next token of one row, logits [V]: ``sample_batch`` of that row alone."""
    return sample_batch(logits[None], [params], [generator], [output_ids], [prompt_ids], eos)[0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 outputs: Sequence[Sequence[int]] | None = None, prompts: Sequence[Sequence[int]] | None = None,
                 eos: Collection[int] = ()) -> list[int]:
    """Next tokens for a batch, logits [B, V], each row with its own params, generator, output and prompt token ids
    (the penalties' history; none: empty) and the model's ``eos`` ids (what ``min_tokens`` masks): see the module
    docstring. Every greedy row is picked by one argmax over those rows; a row's token does not depend on the rows
    beside it."""
    if logits.dim() != 2 or not logits.shape[0] == len(params) == len(generators):
        raise ValueError(f"logits {tuple(logits.shape)} for {len(params)} params and {len(generators)} generators")
    return pick_batch(process_batch(logits, params, outputs, prompts, eos), params, generators)


def process_batch(logits: torch.Tensor, params: list[SamplingParams], outputs: Sequence[Sequence[int]] | None = None,
                  prompts: Sequence[Sequence[int]] | None = None, eos: Collection[int] = ()) -> torch.Tensor:
    """float32 logits [B, V] after each row's logit processors (``process_logits`` of the rows that have any): what
    a greedy row's argmax and the log-probs are taken of, and what a sampled row is drawn from after temperature."""
    n = len(params)
    outputs = outputs if outputs is not None else [()] * n
    prompts = prompts if prompts is not None else [()] * n
    if not len(outputs) == len(prompts) == n:
        raise ValueError(f"{len(outputs)} outputs and {len(prompts)} prompts for {n} rows")
    x = logits.float()
    processed = [i for i, p in enumerate(params) if p.penalized]
    if processed:
        rows = torch.tensor(processed, device=x.device)
        x = x.clone() if x is logits else x
        x[rows] = process_logits(x[rows], [params[i] for i in processed], [outputs[i] for i in processed],
                                 [prompts[i] for i in processed], eos)
    return x


def pick_batch(x: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Next tokens from processed float32 logits [B, V] (``process_batch``): greedy rows by one argmax, sampled rows
    by ``_sample_rows``."""
    n = len(params)
    out = [0] * n
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        rows = x if len(greedy) == n else x[torch.tensor(greedy, device=x.device)]
        for i, token in zip(greedy, torch.argmax(rows, dim=-1).tolist()):
            out[i] = token
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = x if len(sampled) == n else x[torch.tensor(sampled, device=x.device)]
        picks = _sample_rows(rows, [params[i] for i in sampled], [generators[i] for i in sampled])
        for i, token in zip(sampled, picks):
            out[i] = token
    return out


def _pairs(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every id in ``rows``, as two index tensors."""
    r = [i for i, ids in enumerate(rows) for _ in ids]
    t = [tok for ids in rows for tok in ids]
    return (torch.tensor(r, dtype=torch.long, device=device), torch.tensor(t, dtype=torch.long, device=device))


def process_logits(x: torch.Tensor, params: list[SamplingParams], outputs: Sequence[Sequence[int]],
                   prompts: Sequence[Sequence[int]], eos: Collection[int] = ()) -> torch.Tensor:
    """float32 logits [R, V] after ``min_tokens``, ``logit_bias``, ``repetition_penalty``, ``frequency_penalty`` and
    ``presence_penalty`` (vLLM's order), all rows at once; a row none of them applies to comes back unchanged."""
    x = x.clone()
    vocab = x.shape[-1]
    for p in params:
        p.check_vocab(vocab)
    masked = [[*p.stop_token_ids, *(() if p.ignore_eos else eos)] if len(out) < p.min_tokens else []
              for p, out in zip(params, outputs)]
    if any(masked):
        r, t = _pairs(masked, x.device)
        keep = t < vocab  # an EOS id past the logits (a padded config) can never be sampled anyway
        x[r[keep], t[keep]] = float("-inf")
    if any(p.logit_bias for p in params):
        r, t = _pairs([list(p.logit_bias) for p in params], x.device)
        bias = torch.tensor([b for p in params for b in p.logit_bias.values()], dtype=x.dtype, device=x.device)
        x.index_put_((r, t), bias, accumulate=True)
    if any(p.repetition_penalty != 1.0 for p in params):
        r, t = _pairs([[*prompt, *out] for prompt, out in zip(prompts, outputs)], x.device)
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen[r, t] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=x.dtype, device=x.device)[:, None]
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        r, t = _pairs(outputs, x.device)
        counts = torch.zeros_like(x)
        counts.index_put_((r, t), torch.ones_like(t, dtype=x.dtype), accumulate=True)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=x.dtype, device=x.device)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], dtype=x.dtype, device=x.device)[:, None]
        x = x - (freq * counts + pres * (counts > 0).to(x.dtype))
    return x


def _column(values: list[float], x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device)[:, None]


def _sample_rows(x: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Sampled rows [S, V] (float32, processed): temperature, min_p, top-k, top-p, then one uniform draw per row from
    its generator (unseeded rows: torch's global generator) picks the token whose cumulative probability passes it."""
    vocab = x.shape[-1]
    x = x / _column([p.temperature for p in params], x)
    if any(p.min_p > 0 for p in params):
        probs = torch.softmax(x, -1)
        floor = probs.amax(-1, keepdim=True) * _column([p.min_p for p in params], x)
        x = x.masked_fill(probs < floor, float("-inf"))
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        x, order = torch.sort(x, dim=-1, descending=True)
        if any(p.top_k > 0 for p in params):
            k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=x.device)
            kth = x.gather(1, (k - 1)[:, None])
            x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th stay in, as vLLM's top-k
        if any(p.top_p < 1.0 for p in params):
            probs = torch.softmax(x, -1)
            top_p = _column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], x)
            x = x.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))  # the smallest prefix reaching top_p
        x = torch.empty_like(x).scatter_(1, order, x)  # back in vocabulary order: a row's draw ignores the others
    probs = torch.softmax(x, -1)
    if not torch.isfinite(probs).all():
        raise ValueError("no token can be sampled: every logit is -inf or NaN")
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(device=x.device, dtype=x.dtype)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    positions = torch.arange(vocab, device=x.device).expand_as(probs)
    last = torch.where(probs > 0, positions, -1).amax(-1)  # rounding may land past the last token that can be drawn
    return torch.minimum(idx, last).tolist()
