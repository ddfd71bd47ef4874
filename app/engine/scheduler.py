"""The scheduler of one replica: which sequences run in the next step, how many tokens each, and with which blocks.

Each step carries a token for every running sequence that is decoding, plus prefill chunks of sequences still reading
their prompt, up to ``max_num_batched_tokens`` (chunked prefill, as vLLM's scheduler): a long prompt no longer stalls
the streams around it. KV blocks come from ``BlockManager``; when decode runs out of them the newest sequence is
preempted (its blocks freed, its tokens recomputed later), never failed. ``schedule`` answers with a ``StepPlan``, the
typed per-step output vLLM v1 calls ``SchedulerOutput``: the engine runs it and never touches a queue or a block.

Who waits goes first by a ``RequestQueue`` (a policy, swappable: first come first served by default); subclasses
change what a step may hold (the disaggregated engines' schedulers in ``disagg.py``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from app.engine.blocks import ROOT_HASH, BlockManager
from app.engine.messages import Handoff
from app.engine.sequence import Sequence
from strategies.kv_cache import Chunk

DECODE_STRATEGY = "megatron"  # decode tokens always run Megatron: every prefill strategy leaves the cache its way


class RequestQueue(Protocol):
    """The sequences waiting for their first blocks, in the order they are admitted. Admission stops at the first
    that does not fit (no overtaking), so the order is the whole policy."""

    def push(self, seq: Sequence) -> None:
        """A new request."""
    def push_front(self, seq: Sequence) -> None:
        """A preempted sequence: it goes before every new one (its client is already reading its stream)."""
    def peek(self) -> Sequence:
        """The next to admit."""
    def pop(self) -> Sequence:
        """Take the one ``peek`` named."""
    def remove(self, seq: Sequence) -> None:
        """Drop an aborted one."""
    def __contains__(self, seq: object) -> bool: ...
    def __iter__(self) -> Iterator[Sequence]: ...
    def __len__(self) -> int: ...


class FCFSQueue:
    """First come, first served (vLLM's default): arrival order, preempted sequences first."""

    def __init__(self) -> None:
        self._q: deque[Sequence] = deque()

    def push(self, seq: Sequence) -> None:
        self._q.append(seq)

    def push_front(self, seq: Sequence) -> None:
        self._q.appendleft(seq)

    def peek(self) -> Sequence:
        return self._q[0]

    def pop(self) -> Sequence:
        return self._q.popleft()

    def remove(self, seq: Sequence) -> None:
        self._q.remove(seq)

    def __contains__(self, seq: object) -> bool:
        return seq in self._q

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._q)

    def __len__(self) -> int:
        return len(self._q)


@dataclass(frozen=True)
class SchedulerConfig:
    """What bounds a step and the KV cache: the pool's settings (``EngineFields``), and the blocks that fit."""

    num_blocks: int
    block_size: int
    max_num_seqs: int = 64  # sequences holding blocks at once
    max_num_batched_tokens: int = 2048  # tokens one step computes: decode tokens plus prefill chunks
    enable_chunked_prefill: bool = True  # off: a prompt is one step, over the budget if it is the step's first
    enable_prefix_caching: bool = True


class ChunkSizer(Protocol):
    """How many prompt tokens a chunk may have beside what the step already holds (``step_budget.StepBudget``: by
    the pool's TPOT target); without one a chunk takes what is left of ``max_num_batched_tokens``."""

    def limit(self, requested: str, new: list[int], cached: list[int], decoding: list[int], prefix: int,
              remaining: int, cap: int, first: bool, waited_s: float | None = None) -> int: ...


class Scheduled(NamedTuple):
    seq: Sequence
    tokens: int  # of ``seq.all_ids`` from ``seq.num_computed``


class Adoption(NamedTuple):
    """A prefilled sequence joining a decode-only engine: its blocks are reserved, its K/V is in ``handoff``."""

    seq: Sequence
    handoff: Handoff


@dataclass(frozen=True)
class StepPlan:
    """One step's work. ``prefill`` chunks all asked for the same strategy (a pass runs one), then ``decode``
    tokens; the logits come back in that order (``order``), one row per sequence. ``adopted``: sequences whose K/V
    arrives from another replica this step (decode-only engines), no forward pass for them."""

    prefill: list[Scheduled] = field(default_factory=list)
    decode: list[Scheduled] = field(default_factory=list)
    adopted: list[Adoption] = field(default_factory=list)

    @property
    def order(self) -> list[Scheduled]:
        return self.prefill + self.decode

    @property
    def requested(self) -> str | None:
        """The strategy the prefill chunks asked for ("auto": the planner's pick), None without prefill."""
        return self.prefill[0].seq.strategy if self.prefill else None

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefill)

    def parts(self, strategy: str) -> list[tuple[str, list[Chunk]]]:
        """What ``ShardRunner.step`` runs: the prefill chunks by ``strategy``, then the decode tokens by Megatron; one
        pass for every token when ``strategy`` is Megatron."""
        chunks = [Chunk(s.all_ids[s.num_computed:s.num_computed + n], s.num_computed, s.blocks) for s, n in self.order]
        if strategy == DECODE_STRATEGY:
            return [(DECODE_STRATEGY, chunks)]
        return [(strategy, chunks[:len(self.prefill)]), (DECODE_STRATEGY, chunks[len(self.prefill):])]


class Scheduler:
    """Queues (``waiting``: no blocks yet; ``running``: holding blocks, prefilling or decoding, oldest first), chunking,
    block reservation and preemption over one ``BlockManager``."""

    def __init__(self, config: SchedulerConfig, queue: RequestQueue | None = None):
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: RequestQueue = queue if queue is not None else FCFSQueue()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.sizer: ChunkSizer | None = None  # set by the engine when it sizes steps by a TPOT target

    # -- sequences in and out --------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client gone): its blocks are free now."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            seq.finish("abort")
            self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """``seq`` has ended (``seq.finish_reason``): free its blocks; its full ones stay in the prefix cache."""
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []

    def computed(self, seq: Sequence, tokens: int) -> None:
        """``tokens`` more of ``seq`` have K/V in the cache: its blocks that are now full enter the prefix cache."""
        seq.num_computed += tokens
        bs = self.blocks.block_size
        while len(seq.hashes) < seq.num_computed // bs:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else ROOT_HASH
            seq.hashes.append(self.blocks.register(seq.blocks[i], parent, seq.all_ids[i * bs:(i + 1) * bs]))

    # -- what is queued --------------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def queued_sequences(self) -> list[Sequence]:
        """Sequences accepted that hold no KV blocks yet."""
        return list(self.waiting)

    def queued_tokens(self) -> int:
        """Prompt tokens still to prefill: those waiting, and the rest of prompts being prefilled in chunks."""
        return (sum(len(s.all_ids) for s in self.waiting)
                + sum(s.remaining for s in self.running if s.prefilling))

    # -- the next step ---------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Running sequences first (oldest first; decode needs one token, a prompt in progress its next chunk), then
        waiting ones while sequences, blocks and the token budget allow. A decode token that finds no free block
        preempts the newest running sequence; prefill chunks only take blocks that are free."""
        budget = self.config.max_num_batched_tokens
        preempted_before = self.preemptions  # no new admissions in a step that had to preempt
        prefill: list[Scheduled] = []
        decode: list[Scheduled] = []
        scheduled: set[int] = set()
        decoding = [s.num_computed for s in self.running if not s.prefilling] if self.sizer else []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an older one
                continue
            if seq.prefilling:
                if prefill and seq.strategy != prefill[0].seq.strategy:
                    continue
                n = self._chunk(seq, self._limit(seq, budget, prefill, decoding), first=not prefill)
                if n == 0 or not self._reserve(seq, n):
                    continue
                prefill.append(Scheduled(seq, n))
            else:
                n = 1
                if not self._reserve_or_preempt(seq, scheduled):
                    continue  # it was the newest: preempted itself
                decode.append(Scheduled(seq, n))
            scheduled.add(seq.id)
            budget -= n
        while (self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0
               and self.preemptions == preempted_before):
            seq = self.waiting.peek()
            if prefill and seq.strategy != prefill[0].seq.strategy:
                break
            # a prompt still to be scored (prompt_logprobs) computes every position itself: no prefix-cache hit
            hit = [] if seq.needs_prompt_logits else self.blocks.match_prefix(seq.all_ids, count=not seq.preemptions)
            seq.blocks, seq.num_computed = hit, len(hit) * self.blocks.block_size
            seq.hashes = [self.blocks.hash_of[b] for b in hit]
            if not seq.output_ids:
                seq.cached_tokens = seq.num_computed
            n = self._chunk(seq, self._limit(seq, budget, prefill, decoding), first=not prefill)
            if n == 0 or not self._reserve(seq, n):
                self.blocks.release(seq.blocks)
                seq.blocks, seq.hashes, seq.num_computed = [], [], 0
                break
            self.waiting.pop()
            self.running.append(seq)
            prefill.append(Scheduled(seq, n))  # even a one-token prompt: its strategy is the prefill's
            budget -= n
        if not prefill and not decode and self.running:  # prompts in progress hold every block: make room
            self._preempt(self.running[-1])
            return self.schedule()
        return StepPlan(prefill, decode)

    def _limit(self, seq: Sequence, budget: int, prefill: list[Scheduled], decoding: list[int]) -> int:
        """The token budget of ``seq``'s next chunk: what is left of the step's, or less by the ``sizer``."""
        if self.sizer is None or not self.config.enable_chunked_prefill:
            return budget
        return self.sizer.limit(seq.strategy, [n for _, n in prefill], [s.num_computed for s, _ in prefill], decoding,
                                seq.num_computed, seq.remaining, budget, first=not prefill,
                                waited_s=seq.waited_for_first_s(time.perf_counter()))

    def _chunk(self, seq: Sequence, budget: int, first: bool) -> int:
        """Prompt tokens of ``seq`` this step: up to the budget and the free blocks when chunking, else the rest of
        the prompt (over the budget only as the step's ``first`` prompt: the decode tokens then wait behind it)."""
        if self.config.enable_chunked_prefill:
            room = (len(seq.blocks) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
            return max(0, min(seq.remaining, budget, room))
        return seq.remaining if seq.remaining <= budget or first else 0

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Blocks for ``n`` more tokens of ``seq``, if free now."""
        need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.blocks)
        if need > self.blocks.num_free:
            return False
        if need > 0:
            seq.blocks.extend(self.blocks.allocate(need))
        return True

    def _reserve_or_preempt(self, seq: Sequence, scheduled: set[int]) -> bool:
        """Blocks for ``seq``'s next token, preempting the newest running sequences (not yet scheduled this step)
        until they are free; False if ``seq`` itself had to go."""
        while not self._reserve(seq, 1):
            victims = [s for s in self.running if s.id not in scheduled]
            victim = victims[-1]  # the newest; may be ``seq`` itself
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first, to recompute its tokens (prompt and output) later; its full
        blocks stay in the prefix cache until evicted, so the recompute often finds them."""
        self.blocks.release(seq.blocks)
        seq.blocks, seq.hashes, seq.num_computed = [], [], 0
        seq.preemptions += 1
        self.preemptions += 1
        self.running.remove(seq)
        self.waiting.push_front(seq)
