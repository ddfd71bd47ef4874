"""The generation engine of one replica: iteration-level (continuous) batching over a group of shard workers.

Each ``step`` is one forward pass: if requests wait and slots are free, a prefill of as many of them as fit (the
strategy chosen per batch, by the planner when ``auto``); otherwise one Megatron decode step for every running
sequence. New prompts thus join between decode steps and finished sequences leave at once, freeing their slot.
Sampling, stop sequences and EOS are handled here on full logits; the workers only run the model.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine.messages import EngineLoad, Handoff, RequestError
from app.engine.sampling import SamplingParams, make_generator, sample
from placement.workers import Group
from strategies.layout import check_strategy


@dataclass
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    strategy: str  # requested: "auto" or a strategy name
    generator: torch.Generator | None = None
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already handed out as deltas
    finish_reason: str | None = None
    prefill_strategy: str | None = None
    prefill_s: float = 0.0
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_last_token: float | None = None
    handoff: Handoff | None = None  # set by a prefill-only engine: where its K/V waits for the decode replica

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

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


class LLMEngine:
    """Continuous batching over ``group`` (a ``LocalGroup`` or ``ShardGroup``) with ``slots`` KV slots."""

    STEP_EMA = 0.2  # weight of the newest decode step in the step-time average

    def __init__(self, group: Group, tokenizer, eos_token_ids: list[int], slots: int, capacity: int,
                 choose_strategy: Callable[[list[int]], str] | None = None, max_prefill_tokens: int = 8192,
                 predict_prefill_s: Callable[[int], float] | None = None, step_s: float = 0.0):
        self.group, self.tokenizer = group, tokenizer
        self.eos = set(eos_token_ids)
        self.capacity, self.max_prefill_tokens = capacity, max_prefill_tokens
        self.choose_strategy = choose_strategy or (lambda lengths: "megatron")
        self.predict_prefill_s = predict_prefill_s or (lambda tokens: 0.0)  # the planner's, for load estimates
        self.step_s = step_s  # decode step seconds: the planner's guess until steps are measured
        self.slots = slots
        self.free_slots = deque(range(slots))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()

    # -- requests --------------------------------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], params: SamplingParams, strategy: str = "auto") -> Sequence:
        if not prompt_ids:
            raise RequestError("prompt is empty")
        check_strategy(strategy, allow_auto=True, error=RequestError)
        need = len(prompt_ids) + params.max_tokens
        if need > self.capacity:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                               f"exceeds the context limit of {self.capacity} tokens")
        seq = Sequence(id=next(self._ids), prompt_ids=list(prompt_ids), params=params, strategy=strategy,
                       generator=make_generator(params))
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client gone): free its slot and KV cache now."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self._finish(seq, "abort")
            self.running.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def queued_sequences(self) -> list[Sequence]:
        """Sequences accepted that hold no slot yet."""
        return list(self.waiting)

    def queued_tokens(self) -> int:
        return sum(len(s.prompt_ids) for s in self.waiting)

    def load(self) -> EngineLoad:
        """This engine's load and a new request's expected wait (``EngineLoad``); call from the engine's thread."""
        queued, waiting = self.queued_tokens(), self.queued_sequences()
        left = (sum(s.params.max_tokens - len(s.output_ids) for s in self.running)
                + sum(s.params.max_tokens for s in waiting))
        full = len(self.running) + len(waiting) >= self.slots
        slot_wait = self.step_s * left / self.slots if full else 0.0
        wait = (self.predict_prefill_s(queued) if queued else 0.0) + slot_wait
        return EngineLoad(slots=self.slots, running=len(self.running), waiting=len(waiting),
                          waiting_prompt_tokens=queued, decode_tokens_left=left, step_s=self.step_s,
                          slot_wait_s=slot_wait, wait_s=wait)

    def slots_in_use(self) -> int:
        """KV slots held by running sequences (0 once every request has finished or been aborted)."""
        return self.slots - len(self.free_slots)

    # -- iteration -------------------------------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """One forward pass. Returns the sequences that produced a token (finished ones included)."""
        batch = self._admit()
        if batch:
            return self._prefill(batch)
        if self.running:
            return self._decode()
        return []

    def generate(self, prompts: list[list[int]], params: SamplingParams, strategy: str = "auto") -> list[Sequence]:
        """Run prompts to completion (the CLI and benchmarks); they are batched like concurrent requests."""
        seqs = [self.add(p, params, strategy) for p in prompts]
        while not all(s.finished for s in seqs):
            self.step()
        return seqs

    def _admit(self) -> list[Sequence]:
        """Waiting sequences for the next prefill: FIFO, same requested strategy, within free slots and token budget."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(batch) < len(self.free_slots):
            seq = self.waiting[0]
            if batch and (seq.strategy != batch[0].strategy or tokens + len(seq.prompt_ids) > self.max_prefill_tokens):
                break
            batch.append(self.waiting.popleft())
            tokens += len(seq.prompt_ids)
        return batch

    def _prefill(self, batch: list[Sequence]) -> list[Sequence]:
        strategy = batch[0].strategy
        if strategy == "auto":
            strategy = self.choose_strategy([len(s.prompt_ids) for s in batch])
        for seq in batch:
            seq.slot = self.free_slots.popleft()
        t0 = time.perf_counter()
        logits = self.group.call("prefill", [s.prompt_ids for s in batch], [s.slot for s in batch], strategy)
        elapsed = time.perf_counter() - t0
        for seq in batch:
            seq.prefill_strategy, seq.prefill_s = strategy, elapsed
        self.running.extend(batch)
        return self._advance(batch, logits)

    def _decode(self) -> list[Sequence]:
        batch = list(self.running)
        t0 = time.perf_counter()
        logits = self.group.call("decode", [s.output_ids[-1] for s in batch], [s.slot for s in batch])
        out = self._advance(batch, logits)
        took = time.perf_counter() - t0  # the whole step as a sequence sees it: forward, sampling, detokenizing
        self.step_s = took if not self.step_s else (1 - self.STEP_EMA) * self.step_s + self.STEP_EMA * took
        return out

    def _advance(self, batch: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        now = time.perf_counter()
        for seq, row in zip(batch, logits):
            token = sample(row, seq.params, seq.generator)
            seq.output_ids.append(token)
            seq.t_first_token = seq.t_first_token or now
            seq.t_last_token = now
            self._update_text(seq, token)
        done = [s for s in batch if s.finished]
        for seq in done:
            self.running.remove(seq)
        return batch

    def _update_text(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if token in self.eos and not p.ignore_eos:
            self._finish(seq, "stop")
            return
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True) if self.tokenizer else ""
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 character waits for its next token
            seq.text = text
        for stop in p.stop:
            at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
            if at >= 0:
                seq.text = seq.text[:at]
                self._finish(seq, "stop")
                return
        if len(seq.output_ids) >= p.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.slot is not None:
            self.group.call_all("release", [seq.slot])
            self.free_slots.append(seq.slot)
            seq.slot = None
