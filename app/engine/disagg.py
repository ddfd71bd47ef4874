"""Disaggregated serving: a prefill-only engine and a decode-only engine in separate replicas.

The prefill replica runs each prompt (by the planner's strategy, chunk by chunk) to its first token, then every rank
puts its head-sharded K/V of the sequence's blocks into the object store before the blocks are freed; the references
travel with the request to a decode replica, whose rank r fetches rank r's slice directly into blocks of its own and
continues with Megatron decode. Both replicas use
the same model and device count, so the slices line up rank for rank and the tokens equal the aggregated path's.

Each engine is the ordinary ``LLMEngine`` with its own scheduler: what differs is when a sequence's blocks may be
freed (prefill: not before its K/V has left) and how a sequence enters (decode: with its K/V, not its prompt).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from app.engine.llm_engine import LLMEngine
from app.engine.messages import Handoff
from app.engine.params import SamplingParams
from app.engine.scheduler import Adoption, Scheduler, SchedulerConfig, StepPlan
from app.engine.sequence import Sequence

# Each rank's K/V of sequences (block table, length) into the object store: ``Group.put_kv``
PutKV = Callable[[list[tuple[list[int], int]]], list[list]]


class PrefillScheduler(Scheduler):
    """A sequence that stops by length (the prompt still wants more tokens: callers add it with ``max_tokens=1``)
    leaves its K/V slices in the object store as ``seq.handoff`` before its blocks are freed."""

    def __init__(self, config: SchedulerConfig, put_kv: PutKV):
        super().__init__(config)
        self.put_kv = put_kv

    def finish(self, seq: Sequence) -> None:
        if seq.finish_reason == "length" and seq.blocks and seq.output_ids:  # (max_tokens 0: the prompt only)
            seq.handoff = Handoff(prompt_ids=seq.prompt_ids, first_token=seq.output_ids[-1],
                                  kv_refs=self.put_kv([(seq.blocks, seq.num_computed)]),
                                  first_logprob=seq.logprobs[-1] if seq.logprobs else None)
        super().finish(seq)


class DecodeScheduler(Scheduler):
    """Sequences arrive prefilled (``arrive``); each waits for room (a sequence and its blocks, with one for its next
    token), then a step adopts them (``StepPlan.adopted``: their K/V fetched, no forward pass) before any decoding
    resumes, so a handoff waits no longer than one step."""

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        self.arriving: deque[Adoption] = deque()

    def arrive(self, seq: Sequence, handoff: Handoff) -> None:
        self.arriving.append(Adoption(seq, handoff))

    def abort(self, seq: Sequence) -> None:
        self.arriving = deque(a for a in self.arriving if a.seq is not seq)
        super().abort(seq)

    def has_work(self) -> bool:
        return bool(self.arriving) or super().has_work()

    def queued_sequences(self) -> list[Sequence]:
        return [*super().queued_sequences(), *(a.seq for a in self.arriving)]

    def schedule(self) -> StepPlan:
        adopted = []
        while self.arriving and len(self.running) < self.config.max_num_seqs:
            seq, handoff = self.arriving[0]
            n = len(handoff.prompt_ids)
            if self.blocks.blocks_for(n + 1) > self.blocks.num_free:
                break
            self.arriving.popleft()
            seq.blocks = self.blocks.allocate(self.blocks.blocks_for(n))
            self.running.append(seq)
            adopted.append(Adoption(seq, handoff))
        return StepPlan(adopted=adopted) if adopted else super().schedule()


class PrefillEngine(LLMEngine):
    """Prefill only: callers add sequences with ``max_tokens=1``; see ``PrefillScheduler``."""

    def make_scheduler(self, config: SchedulerConfig) -> Scheduler:
        return PrefillScheduler(config, self.group.put_kv)


class DecodeEngine(LLMEngine):
    """Decode only: sequences arrive prefilled (``adopt``) and join the running batch with their first token already
    sampled; see ``DecodeScheduler``."""

    scheduler: DecodeScheduler

    def make_scheduler(self, config: SchedulerConfig) -> Scheduler:
        return DecodeScheduler(config)

    def adopt(self, handoff: Handoff, params: SamplingParams) -> Sequence:
        seq = self.new_sequence(handoff.prompt_ids, params)  # the same limits as an aggregated request
        self.scheduler.arrive(seq, handoff)
        return seq
