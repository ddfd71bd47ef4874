"""The generation engine of one replica: iteration-level (continuous) batching over a paged KV cache.

Each ``step`` is one forward pass carrying a token for every running sequence that is decoding, plus prefill chunks
of sequences still reading their prompt, up to ``max_num_batched_tokens`` (chunked prefill, as vLLM's scheduler):
a long prompt no longer stalls the streams around it. The chunks' strategy is chosen for that step by the planner
(their token counts and the cached prefix they attend to); decode tokens run Megatron. A sequence is just its tokens
and how many of them have K/V in the cache (``num_computed``): prefill, decode, a prefix-cache hit and a recompute
after preemption are all "compute the rest". KV blocks come from ``BlockManager``; when decode runs out of them the
newest sequence is preempted (its blocks freed, its tokens recomputed later), never failed.
Sampling, stop sequences and EOS are handled here on full logits; the workers only run the model.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine.blocks import ROOT_HASH, BlockManager
from app.engine.detokenize import IncrementalDetokenizer
from app.engine.messages import EngineLoad, Handoff, RequestError
from app.engine.sampling import SamplingParams, make_generator, sample_batch
from placement.workers import Group
from strategies.kv_cache import Chunk
from strategies.layout import STRATEGY_NAMES, check_strategy

WATCHDOG_FACTOR = 10.0  # a step may take this many times its predicted time (at least the floor) before it is hung


@dataclass(eq=False)  # identity: ``seq in self.running`` must not compare every field
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    strategy: str  # requested: "auto" or a strategy name
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    output_ids: list[int] = field(default_factory=list)
    all_ids: list[int] = field(default_factory=list)  # prompt then output: what the cache must hold
    num_computed: int = 0  # tokens of ``all_ids`` whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)  # block table
    hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks computed so far
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    preemptions: int = 0
    strategy_tokens: dict[str, int] = field(default_factory=dict)  # prompt tokens prefilled per strategy
    text: str = ""
    emitted: int = 0  # characters of ``text`` already handed out as deltas
    finish_reason: str | None = None
    error: str | None = None  # why it failed, when ``finish_reason`` is "error"
    prefill_strategy: str | None = None
    prefill_s: float = 0.0
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_last_token: float | None = None
    handoff: Handoff | None = None  # set by a prefill-only engine: where its K/V waits for the decode replica

    def __post_init__(self) -> None:
        self.all_ids = list(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        """Tokens to compute before the next token can be sampled (1 while decoding)."""
        return len(self.all_ids) - self.num_computed

    @property
    def prefilling(self) -> bool:
        return self.remaining > 1

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
    """Continuous batching over ``group`` (a ``LocalGroup`` or ``ShardGroup``) whose ranks hold ``num_blocks`` KV
    blocks of ``block_size`` tokens each."""

    STEP_EMA = 0.2  # weight of the newest decode step in the step-time average

    def __init__(self, group: Group, tokenizer, eos_token_ids: list[int], num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True,
                 choose_strategy: Callable[[list[int], list[int], list[int]], str] | None = None,
                 predict_prefill_s: Callable[[int], float] | None = None, step_s: float = 0.0,
                 layouts: list[str] | None = None, contenders: list[str] | None = None,
                 watchdog_floor_s: float = 30.0):
        self.group, self.tokenizer = group, tokenizer
        # Layouts built at start (named strategies + the executable front that fit), and those offered: the ones a
        # request may name and the ingress prices (``build_engine``: the planner's picks, the named strategies, a
        # pinned layout). Nothing is built in a step: a request naming another layout is refused in ``add``.
        self.layouts = layouts or list(STRATEGY_NAMES)
        self.contenders = contenders or self.layouts
        self.eos = set(eos_token_ids)
        # logit_bias and stop_token_ids are checked against this: the tokenizer's size until a step shows the logits'
        self.vocab_size: int | None = len(tokenizer) if tokenizer is not None else None
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.max_num_batched_tokens, self.chunked = max_num_batched_tokens, enable_chunked_prefill
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        # (chunk lengths, their cached prefixes, the contexts of the decode tokens in the same step) -> strategy
        self.choose_strategy = choose_strategy or (lambda new, cached, decoding: "megatron")
        self.predict_prefill_s = predict_prefill_s or (lambda tokens: 0.0)  # the planner's, for load estimates
        self.step_s = step_s  # decode step seconds: the planner's guess until steps are measured
        # The step watchdog (``EngineLoop``): a step running past its deadline means a hung worker
        self.watchdog_floor_s = watchdog_floor_s
        self.step_started: float | None = None  # perf_counter() while a step runs
        self.step_deadline_s = watchdog_floor_s
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: holding blocks, prefilling or decoding, oldest first
        self.preemptions = 0
        self._ids = itertools.count()

    # -- requests --------------------------------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], params: SamplingParams, strategy: str = "auto") -> Sequence:
        if not prompt_ids:
            raise RequestError("prompt is empty")
        strategy = check_strategy(strategy, allow_auto=True, error=RequestError)
        if strategy != "auto" and strategy not in self.contenders:
            raise RequestError(f"prefill strategy {strategy!r} was not built when this engine started (only the "
                               f"layouts built then run; a step never builds one): it runs "
                               f"{', '.join(map(repr, self.contenders))}", param="strategy")
        if self.vocab_size is not None:
            params.check_vocab(self.vocab_size)
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                               f"exceeds the context limit of {self.max_model_len} tokens")
        kv_tokens = self.blocks.num_blocks * self.blocks.block_size
        if need > kv_tokens:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                               f"exceeds this replica's whole KV cache of {kv_tokens} tokens")
        seq = Sequence(id=next(self._ids), prompt_ids=list(prompt_ids), params=params, strategy=strategy,
                       generator=make_generator(params),
                       detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens))
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client gone): free its KV blocks now."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self._finish(seq, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def queued_sequences(self) -> list[Sequence]:
        """Sequences accepted that hold no KV blocks yet."""
        return list(self.waiting)

    def queued_tokens(self) -> int:
        """Prompt tokens still to prefill: those waiting, and the rest of prompts being prefilled in chunks."""
        return (sum(len(s.all_ids) for s in self.waiting)
                + sum(s.remaining for s in self.running if s.prefilling))

    def load(self) -> EngineLoad:
        """This engine's load and a new request's expected wait (``EngineLoad``); call from the engine's thread."""
        queued, waiting = self.queued_tokens(), self.queued_sequences()
        left = (sum(s.params.max_tokens - len(s.output_ids) for s in self.running)
                + sum(s.params.max_tokens for s in waiting))
        need_blocks = sum(self.blocks.blocks_for(len(s.all_ids) + s.params.max_tokens) for s in waiting)
        full = (len(self.running) + len(waiting) >= self.max_num_seqs
                or need_blocks > self.blocks.num_free)
        slot_wait = self.step_s * left / self.max_num_seqs if full else 0.0
        wait = (self.predict_prefill_s(queued) if queued else 0.0) + slot_wait
        return EngineLoad(max_seqs=self.max_num_seqs, running=len(self.running), waiting=len(waiting),
                          waiting_prompt_tokens=queued, decode_tokens_left=left, step_s=self.step_s,
                          slot_wait_s=slot_wait, wait_s=wait, free_blocks=self.blocks.num_free,
                          total_blocks=self.blocks.num_blocks, prefix_hit_rate=self.blocks.hit_rate,
                          preemptions=self.preemptions)

    def seqs_in_use(self) -> int:
        """Sequences holding KV blocks (0 once every request has finished or been aborted)."""
        return len(self.running)

    # -- iteration -------------------------------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """One forward pass. Returns the sequences that produced a token (finished ones included)."""
        prefill, decode = self._schedule()
        if not prefill and not decode:
            return []
        strategy = "megatron"
        if prefill:
            requested = prefill[0][0].strategy
            strategy = requested if requested != "auto" else self.choose_strategy(
                [n for _, n in prefill], [s.num_computed for s, _ in prefill], [s.num_computed for s, _ in decode])
        order = prefill + decode
        chunks = [Chunk(s.all_ids[s.num_computed:s.num_computed + n], s.num_computed, s.blocks) for s, n in order]
        if strategy == "megatron":  # one pass for every token
            parts = [("megatron", chunks)]
        else:  # the prefill chunks by their strategy, then the decode tokens by megatron
            parts = [(strategy, chunks[:len(prefill)]), ("megatron", chunks[len(prefill):])]
        prefill_tokens = sum(n for _, n in prefill)
        predicted = (self.predict_prefill_s(prefill_tokens) if prefill_tokens else 0.0) + (self.step_s if decode else 0)
        self.step_deadline_s = max(self.watchdog_floor_s, WATCHDOG_FACTOR * predicted)
        t0 = self.step_started = time.perf_counter()
        try:
            logits = self.group.call("step", parts)
        finally:
            self.step_started = None
        took = time.perf_counter() - t0
        for seq, n in prefill:
            seq.strategy_tokens[strategy] = seq.strategy_tokens.get(strategy, 0) + n
            seq.prefill_strategy = max(seq.strategy_tokens, key=seq.strategy_tokens.get)
            seq.prefill_s += took
        ready, rows = [], []
        for b, (seq, n) in enumerate(order):
            seq.num_computed += n
            self._register_full_blocks(seq)
            if seq.remaining == 0:  # its last token computed: this row predicts the next one
                ready.append(seq)
                rows.append(b)
        out = self._advance(ready, logits[rows] if len(rows) < len(order) else logits)
        if decode:  # the whole step as a decoding sequence sees it: forward, sampling, detokenizing
            took = time.perf_counter() - t0
            self.step_s = took if not self.step_s else (1 - self.STEP_EMA) * self.step_s + self.STEP_EMA * took
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams, strategy: str = "auto") -> list[Sequence]:
        """Run prompts to completion (the CLI and benchmarks); they are batched like concurrent requests."""
        seqs = [self.add(p, params, strategy) for p in prompts]
        while not all(s.finished for s in seqs):
            self.step()
        return seqs

    # -- scheduling ------------------------------------------------------------------------------------------------

    def _schedule(self) -> tuple[list[tuple[Sequence, int]], list[tuple[Sequence, int]]]:
        """This step's work: (sequence, tokens) of prefill chunks and of decode tokens. Running sequences first
        (oldest first; decode needs one token, a prompt in progress its next chunk), then waiting ones while
        sequences, blocks and the token budget allow. A decode token that finds no free block preempts the newest
        running sequence; prefill chunks only take blocks that are free."""
        budget = self.max_num_batched_tokens
        preempted_before = self.preemptions  # no new admissions in a step that had to preempt
        prefill: list[tuple[Sequence, int]] = []
        decode: list[tuple[Sequence, int]] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an older one
                continue
            if seq.prefilling:
                if prefill and seq.strategy != prefill[0][0].strategy:
                    continue
                n = self._chunk(seq, budget, first=not prefill)
                if n == 0 or not self._reserve(seq, n):
                    continue
                prefill.append((seq, n))
            else:
                n = 1
                if not self._reserve_or_preempt(seq, scheduled):
                    continue  # it was the newest: preempted itself
                decode.append((seq, n))
            scheduled.add(seq.id)
            budget -= n
        while (self.waiting and len(self.running) < self.max_num_seqs and budget > 0
               and self.preemptions == preempted_before):
            seq = self.waiting[0]
            if prefill and seq.strategy != prefill[0][0].strategy:
                break
            hit = self.blocks.match_prefix(seq.all_ids, count=not seq.preemptions)
            seq.blocks, seq.num_computed = hit, len(hit) * self.blocks.block_size
            seq.hashes = [self.blocks.hash_of[b] for b in hit]
            if not seq.output_ids:
                seq.cached_tokens = seq.num_computed
            n = self._chunk(seq, budget, first=not prefill)
            if n == 0 or not self._reserve(seq, n):
                self.blocks.release(seq.blocks)
                seq.blocks, seq.hashes, seq.num_computed = [], [], 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            prefill.append((seq, n))  # even a one-token prompt: its strategy is the prefill's
            budget -= n
        if not prefill and not decode and self.running:  # prompts in progress hold every block: make room
            self._preempt(self.running[-1])
            return self._schedule()
        return prefill, decode

    def _chunk(self, seq: Sequence, budget: int, first: bool) -> int:
        """Prompt tokens of ``seq`` this step: up to the budget and the free blocks when chunking, else the rest of
        the prompt (over the budget only as the step's ``first`` prompt: the decode tokens then wait behind it)."""
        if self.chunked:
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
        self.waiting.appendleft(seq)

    def _register_full_blocks(self, seq: Sequence) -> None:
        bs = self.blocks.block_size
        while len(seq.hashes) < seq.num_computed // bs:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else ROOT_HASH
            seq.hashes.append(self.blocks.register(seq.blocks[i], parent, seq.all_ids[i * bs:(i + 1) * bs]))

    # -- tokens ----------------------------------------------------------------------------------------------------

    def _advance(self, ready: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        """Sample the next token of every ``ready`` sequence: the rows of ``logits`` together (``sample_batch``)."""
        if not ready:
            return []
        self.vocab_size = logits.shape[-1]
        try:
            tokens: list[int | None] = sample_batch(logits, [s.params for s in ready], [s.generator for s in ready],
                                                    [s.output_ids for s in ready], [s.prompt_ids for s in ready],
                                                    self.eos)
        except Exception:  # one row's failure must not end the others: sample them one by one
            tokens = [self._sample_alone(seq, row) for seq, row in zip(ready, logits)]
        now = time.perf_counter()
        for seq, token in zip(ready, tokens):
            if token is None:
                continue
            seq.output_ids.append(token)
            seq.all_ids.append(token)
            seq.t_first_token = seq.t_first_token or now
            seq.t_last_token = now
            try:
                self._update_text(seq, token)
            except Exception as e:  # a detokenizer failure ends this sequence only
                self._fail(seq, f"detokenizing failed: {type(e).__name__}: {e}")
        return ready

    def _sample_alone(self, seq: Sequence, row: torch.Tensor) -> int | None:
        try:
            return sample_batch(row[None], [seq.params], [seq.generator], [seq.output_ids], [seq.prompt_ids],
                                self.eos)[0]
        except Exception as e:
            self._fail(seq, f"sampling failed: {type(e).__name__}: {e}")
            return None

    def _fail(self, seq: Sequence, error: str) -> None:
        seq.error = error
        self._finish(seq, "error")

    def _update_text(self, seq: Sequence, token: int) -> None:
        """Text and stopping after ``token``: EOS (unless ``ignore_eos``) and ``stop_token_ids`` end the sequence
        (their text kept only with ``include_stop_str_in_output``), as does a stop string (cut before it, or after
        it with ``include_stop_str_in_output``); none of them before ``min_tokens`` output tokens."""
        p = seq.params
        stopping = len(seq.output_ids) >= p.min_tokens
        if stopping and ((token in self.eos and not p.ignore_eos) or token in p.stop_token_ids):
            if p.include_stop_str_in_output:
                seq.text = seq.detokenizer.append(token)
            self._finish(seq, "stop")
            return
        seq.text = seq.detokenizer.append(token)  # an incomplete UTF-8 character waits for its next token
        for stop in p.stop if stopping else ():
            at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
            if at >= 0:
                seq.text = seq.text[:at + len(stop)] if p.include_stop_str_in_output else seq.text[:at]
                self._finish(seq, "stop")
                return
        if len(seq.output_ids) >= p.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []
