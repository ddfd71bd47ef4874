"""Disaggregated serving: a prefill-only engine and a decode-only engine in separate replicas.

The prefill replica runs each prompt (by the planner's strategy, chunk by chunk) to its first token, then every rank
puts its head-sharded K/V of the sequence's blocks into the object store before the blocks are freed; the references
travel with the request to a decode replica, whose rank r fetches rank r's slice directly into blocks of its own and
continues with Megatron decode. Both replicas use
the same model and device count, so the slices line up rank for rank and the tokens equal the aggregated path's.
"""

from __future__ import annotations

import time
from collections import deque

from app.engine.llm_engine import LLMEngine, Sequence
from app.engine.messages import Handoff
from app.engine.sampling import SamplingParams


class PrefillEngine(LLMEngine):
    """Prefill only: callers add sequences with ``max_tokens=1``; a sequence that stops by length (the prompt still
    wants more tokens) leaves its K/V slices in the object store as ``seq.handoff`` before its blocks are freed."""

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason == "length" and seq.blocks:
            seq.handoff = Handoff(prompt_ids=seq.prompt_ids, first_token=seq.output_ids[-1],
                                  kv_refs=self.group.put_kv([(seq.blocks, seq.num_computed)]))
        super()._finish(seq, reason)


class DecodeEngine(LLMEngine):
    """Decode only: sequences arrive prefilled (``adopt``); each waits for room (a sequence and its blocks), pulls
    its K/V rank to rank into its blocks, and joins the running batch with its first token already sampled."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arriving: deque[tuple[Sequence, Handoff]] = deque()

    def adopt(self, handoff: Handoff, params: SamplingParams) -> Sequence:
        seq = self.add(handoff.prompt_ids, params)  # the same limits as an aggregated request
        self.waiting.remove(seq)
        self.arriving.append((seq, handoff))
        return seq

    def has_work(self) -> bool:
        return bool(self.arriving) or super().has_work()

    def queued_sequences(self) -> list[Sequence]:
        return [*super().queued_sequences(), *(seq for seq, _ in self.arriving)]

    def abort(self, seq: Sequence) -> None:
        self.arriving = deque(a for a in self.arriving if a[0] is not seq)
        super().abort(seq)

    def step(self) -> list[Sequence]:
        adopted = self._adopt()
        return adopted or super().step()

    def _adopt(self) -> list[Sequence]:
        adopted = []
        while self.arriving and len(self.running) < self.max_num_seqs:
            seq, handoff = self.arriving[0]
            n = len(handoff.prompt_ids)
            if self.blocks.blocks_for(n + 1) > self.blocks.num_free:
                break
            self.arriving.popleft()
            seq.blocks = self.blocks.allocate(self.blocks.blocks_for(n))
            self.group.take_kv([seq.blocks], handoff.kv_refs)  # <- each rank fetches its own slice
            seq.num_computed = n
            self._register_full_blocks(seq)
            seq.output_ids.append(handoff.first_token)
            seq.all_ids.append(handoff.first_token)
            seq.t_first_token = seq.t_last_token = time.perf_counter()
            self.running.append(seq)
            self._update_text(seq, handoff.first_token)  # may finish it (a stop string), releasing its blocks
            adopted.append(seq)
        return adopted
