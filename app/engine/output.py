"""From a step's logits to what a client sees: the next tokens, the text, and whether each sequence has ended.

Sampling, stop sequences and EOS are handled here on full logits (the workers only run the model): a step's rows are
sampled together (``process_batch``, ``pick_batch``), each from its own generator; the rows whose request asked for
log-probs get them from the same processed logits (``logprobs_of``, see ``app.engine.sampling``). A failure is one
request's, never the batch's: a row whose sampling raises is retried alone and only that sequence fails, as does one
whose detokenizer raises (``finish_reason`` "error", ``error`` saying why); the engine frees the blocks of every
sequence that ended.
"""

from __future__ import annotations

import time

import torch

from app.engine.detokenize import IncrementalDetokenizer
from app.engine.messages import TokenLogprob
from app.engine.params import SamplingParams
from app.engine.sampling import logprobs_of, pick_batch, process_batch
from app.engine.sequence import Sequence


class OutputProcessor:
    """Turns logits into tokens, text and finish reasons for the sequences of one engine (its tokenizer and EOS)."""

    def __init__(self, tokenizer, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        # logit_bias and stop_token_ids are checked against this: the tokenizer's size until a step shows the logits'
        self.vocab_size: int | None = len(tokenizer) if tokenizer is not None else None

    def check(self, params: SamplingParams) -> None:
        """A request's token ids fit the vocabulary (``RequestError`` naming the field)."""
        if self.vocab_size is not None:
            params.check_vocab(self.vocab_size)

    def detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)

    def process(self, ready: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        """Sample the next token of every ``ready`` sequence (row i of ``logits`` is ``ready[i]``'s) and take it."""
        if not ready:
            return []
        self.vocab_size = logits.shape[-1]
        try:
            tokens, entries = self._sample(ready, logits)
        except Exception:  # one row's failure must not end the others: sample them one by one
            tokens, entries = [], []
            for seq, row in zip(ready, logits):
                token, entry = self._sample_alone(seq, row)
                tokens.append(token)
                entries.append(entry)
        now = time.perf_counter()
        for seq, token, entry in zip(ready, tokens, entries):
            if token is not None:
                self.accept(seq, token, now, entry)
        return ready

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """The rows' next tokens, and the log-probs of those whose request asked (only those rows pay for them)."""
        params = [s.params for s in seqs]
        x = process_batch(logits, params, [s.output_ids for s in seqs], [s.prompt_ids for s in seqs], self.eos)
        tokens = pick_batch(x, params, [s.generator for s in seqs])
        entries: list[TokenLogprob | None] = [None] * len(seqs)
        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        if asked:
            rows = x if len(asked) == len(seqs) else x[asked]
            for i, e in zip(asked, logprobs_of(rows, [tokens[i] for i in asked], [params[i].logprobs for i in asked])):
                entries[i] = e
        return tokens, entries

    def accept(self, seq: Sequence, token: int, now: float | None = None, logprob: TokenLogprob | None = None) -> None:
        """``token`` is ``seq``'s next (with its log-probs, when asked): its text, and whether it ends there (a
        decode-only engine takes the prefill replica's first token this way)."""
        now = time.perf_counter() if now is None else now
        seq.output_ids.append(token)
        seq.all_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.t_first_token = seq.t_first_token or now
        seq.t_last_token = now
        try:
            self._update_text(seq, token)
        except Exception as e:  # a detokenizer failure ends this sequence only
            seq.finish("error", f"detokenizing failed: {type(e).__name__}: {e}")

    def _sample_alone(self, seq: Sequence, row: torch.Tensor) -> tuple[int | None, TokenLogprob | None]:
        try:
            tokens, entries = self._sample([seq], row[None])
            return tokens[0], entries[0]
        except Exception as e:
            seq.finish("error", f"sampling failed: {type(e).__name__}: {e}")
            return None, None

    def _update_text(self, seq: Sequence, token: int) -> None:
        """Text and stopping after ``token``: EOS (unless ``ignore_eos``) and ``stop_token_ids`` end the sequence
        (their text kept only with ``include_stop_str_in_output``), as does a stop string (cut before it, or after
        it with ``include_stop_str_in_output``); none of them before ``min_tokens`` output tokens."""
        p = seq.params
        stopping = len(seq.output_ids) >= p.min_tokens
        if stopping and ((token in self.eos and not p.ignore_eos) or token in p.stop_token_ids):
            if p.include_stop_str_in_output:
                seq.text = seq.detokenizer.append(token)
            seq.finish("stop")
            return
        seq.text = seq.detokenizer.append(token)  # an incomplete UTF-8 character waits for its next token
        for stop in p.stop if stopping else ():
            at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
            if at >= 0:
                seq.text = seq.text[:at + len(stop)] if p.include_stop_str_in_output else seq.text[:at]
                seq.finish("stop")
                return
        if len(seq.output_ids) >= p.max_tokens:
            seq.finish("length")
