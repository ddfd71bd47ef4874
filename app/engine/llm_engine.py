"""The generation engine of one replica: iteration-level (continuous) batching over a paged KV cache.

``add`` checks a request against what this engine can serve and queues it; ``step`` asks the scheduler for the next
step (``Scheduler.schedule``: which sequences, how many tokens, which blocks), picks the prefill chunks' strategy
(the planner, given their token counts and the cached prefix they attend to; decode tokens run Megatron), runs the
step on the shard workers, and hands the logits to the output processor (tokens, text, stops); ``load`` says how busy
it is. The three rooms are apart so each can change alone: ``scheduler.py`` (queues, chunking, blocks, preemption),
``output.py`` (sampling, stops, detokenizing), ``sequence.py`` (one request's state). The disaggregated engines
(``disagg.py``) plug in their own scheduler (``make_scheduler``).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from app.engine.blocks import BlockManager
from app.engine.messages import EngineLoad, RequestError
from app.engine.output import OutputProcessor
from app.engine.predictor import StepPrediction, StepPredictor
from app.engine.params import SamplingParams
from app.engine.sampling import logprobs_of, make_generator
from app.engine.scheduler import DECODE_STRATEGY, Adoption, Scheduler, SchedulerConfig, StepPlan
from app.engine.sequence import Sequence
from app.engine.step_budget import StepBudget
from placement.workers import Group
from strategies.layout import STRATEGY_NAMES, check_strategy

STEP_TRACE_ENV = "DYNPART_STEP_TRACE"  # a file every engine of this process appends one JSON line per step to
WATCHDOG_FACTOR = 10.0  # a step may take this many times its predicted time (at least the floor) before it is hung

# (chunk lengths, their cached prefixes, the contexts of the decode tokens in the same step) -> strategy
ChooseStrategy = Callable[[list[int], list[int], list[int]], str]

__all__ = ["LLMEngine", "Sequence", "WATCHDOG_FACTOR"]


class LLMEngine:
    """Continuous batching over ``group`` (a ``LocalGroup`` or ``ShardGroup``) whose ranks hold ``num_blocks`` KV
    blocks of ``block_size`` tokens each; ``limits`` are the ``SchedulerConfig`` fields (``num_blocks``,
    ``block_size``, ``max_num_seqs``, ``max_num_batched_tokens`` (with ``tpot_s``, only the cap of a budget the
    predictor sizes), ``enable_chunked_prefill``, ``enable_prefix_caching``)."""

    STEP_EMA = 0.2  # weight of the newest decode step in the step-time average

    def __init__(self, group: Group, tokenizer, eos_token_ids: list[int], max_model_len: int, *,
                 choose_strategy: ChooseStrategy | None = None, predict_prefill_s: Callable[[int], float] | None = None,
                 step_s: float = 0.0, layouts: list[str] | None = None, contenders: list[str] | None = None,
                 watchdog_floor_s: float = 30.0, predictor: StepPredictor | None = None, tpot_s: float | None = None,
                 ttft_s: float | None = None, **limits: Any):
        self.group, self.tokenizer = group, tokenizer
        # Layouts built at start (named strategies + the executable front that fit), and those offered: the ones a
        # request may name and the ingress prices (``build_engine``: the planner's picks, the named strategies, a
        # pinned layout). Nothing is built in a step: a request naming another layout is refused in ``add``.
        self.layouts = layouts or list(STRATEGY_NAMES)
        self.contenders = contenders or self.layouts
        self.max_model_len = max_model_len
        self.scheduler = self.make_scheduler(SchedulerConfig(**limits))
        self.output = OutputProcessor(tokenizer, eos_token_ids)
        # The planner corrected by this engine's measured steps (``build_engine``); without one, ``choose_strategy``
        # and ``predict_prefill_s`` (tests) or Megatron and no predictions
        self.predictor = predictor
        self.choose_strategy = choose_strategy or (lambda new, cached, decoding: DECODE_STRATEGY)
        # With a TPOT target each step's prefill is sized so the streams keep it (``step_budget.py``), else fixed
        self.step_budget = StepBudget(predictor, tpot_s, self.scheduler.config.block_size, ttft_s=ttft_s) if (
            predictor is not None and tpot_s) else None
        self.scheduler.sizer = self.step_budget
        self.predict_prefill_s = predict_prefill_s or (predictor.prefill_s if predictor else (lambda tokens: 0.0))
        self.step_s = step_s  # decode step seconds: the planner's guess until steps are measured
        # The step watchdog (``EngineLoop``): a step running past its deadline means a hung worker
        self.watchdog_floor_s = watchdog_floor_s
        self.step_started: float | None = None  # perf_counter() while a step runs
        self.step_deadline_s = watchdog_floor_s
        self._ids = itertools.count()
        # Operators' view of what each step ran (``$DYNPART_STEP_TRACE``): the passes, their tokens, their time
        self.trace = open(path, "a", buffering=1) if (path := os.environ.get(STEP_TRACE_ENV)) else None

    def make_scheduler(self, config: SchedulerConfig) -> Scheduler:
        """The scheduler this engine runs (the disaggregated engines plug in theirs; a queue policy plugs in here)."""
        return Scheduler(config)

    # What the replica shell, the load tests and the tests read of the scheduler
    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def blocks(self) -> BlockManager:
        return self.scheduler.blocks

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    # -- requests --------------------------------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], params: SamplingParams, strategy: str = "auto") -> Sequence:
        seq = self.new_sequence(prompt_ids, params, strategy)
        self.scheduler.add(seq)
        return seq

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, strategy: str = "auto") -> Sequence:
        """A sequence for this request, not yet queued; ``RequestError`` if this engine cannot serve it (its limits
        are checked here, at the door, so no step ever fails on a request's account)."""
        if not prompt_ids:
            raise RequestError("prompt is empty")
        strategy = check_strategy(strategy, allow_auto=True, error=RequestError)
        if strategy != "auto" and strategy not in self.contenders:
            raise RequestError(f"prefill strategy {strategy!r} was not built when this engine started (only the "
                               f"layouts built then run; a step never builds one): it runs "
                               f"{', '.join(map(repr, self.contenders))}", param="strategy")
        self.output.check(params)
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                               f"exceeds the context limit of {self.max_model_len} tokens")
        kv_tokens = self.blocks.num_blocks * self.blocks.block_size
        if need > kv_tokens:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                               f"exceeds this replica's whole KV cache of {kv_tokens} tokens")
        return Sequence(id=next(self._ids), prompt_ids=list(prompt_ids), params=params, strategy=strategy,
                        generator=make_generator(params), detokenizer=self.output.detokenizer(params))

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client gone): free its KV blocks now."""
        self.scheduler.abort(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def queued_sequences(self) -> list[Sequence]:
        """Sequences accepted that hold no KV blocks yet."""
        return self.scheduler.queued_sequences()

    def queued_tokens(self) -> int:
        """Prompt tokens still to prefill: those waiting, and the rest of prompts being prefilled in chunks."""
        return self.scheduler.queued_tokens()

    def load(self) -> EngineLoad:
        """This engine's load and a new request's expected wait (``EngineLoad``); call from the engine's thread."""
        queued, waiting, running = self.queued_tokens(), self.queued_sequences(), self.running
        max_num_seqs = self.scheduler.config.max_num_seqs
        left = (sum(s.tokens_left for s in running)
                + sum(s.params.max_tokens for s in waiting))
        need_blocks = sum(self.blocks.blocks_for(len(s.all_ids) + s.params.max_tokens) for s in waiting)
        full = len(running) + len(waiting) >= max_num_seqs or need_blocks > self.blocks.num_free
        slot_wait = self.step_s * left / max_num_seqs if full else 0.0
        alone, paced = self.prefill_wait_s(queued) if queued else (0.0, 0.0)
        return EngineLoad(max_seqs=max_num_seqs, running=len(running), waiting=len(waiting),
                          waiting_prompt_tokens=queued, decode_tokens_left=left, step_s=self.step_s,
                          slot_wait_s=slot_wait, wait_s=max(alone, paced) + slot_wait,
                          paced_s=max(0.0, paced - alone), free_blocks=self.blocks.num_free,
                          total_blocks=self.blocks.num_blocks, prefix_hit_rate=self.blocks.hit_rate,
                          preemptions=self.preemptions,
                          correction=self.predictor.table().entries if self.predictor else {})

    def prefill_wait_s(self, tokens: int) -> tuple[float, float]:
        """Seconds until ``tokens`` waiting prompt tokens are read: (the planner's lone prefill of them, the step
        budget's pace of them; 0 without a budget or with no stream decoding). Beside streams each step reads only
        what keeps their TPOT; the prompts read join them; once they end, prompts read at full speed
        (``step_budget.paced_wait_s``)."""
        alone = self.predict_prefill_s(tokens)
        if self.step_budget is None or not any(not s.prefilling for s in self.running):
            return alone, 0.0
        now, budget = time.perf_counter(), self.step_budget
        prompts = [(s.remaining, s.tokens_left, budget.due_in_s(len(s.all_ids), s.waited_for_first_s(now)))
                   for s in [*(s for s in self.running if s.prefilling), *self.queued_sequences()]]
        streams = [s.tokens_left for s in self.running if not s.prefilling]
        return alone, budget.paced_wait_s(prompts, streams, self.predict_prefill_s)

    def seqs_in_use(self) -> int:
        """Sequences holding KV blocks (0 once every request has finished or been aborted)."""
        return len(self.running)

    # -- iteration -------------------------------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """One step of the scheduler's plan. Returns the sequences that produced a token (finished ones included);
        the blocks of those that finished are free when it returns."""
        plan = self.scheduler.schedule()
        out = [self._adopt(a) for a in plan.adopted]
        if plan.order:
            out += self._run(plan)
        for seq in out:
            if seq.finished:
                self.scheduler.finish(seq)
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams, strategy: str = "auto") -> list[Sequence]:
        """Run prompts to completion (the CLI and benchmarks); they are batched like concurrent requests."""
        seqs = [self.add(p, params, strategy) for p in prompts]
        while not all(s.finished for s in seqs):
            self.step()
        return seqs

    def _predict(self, plan: StepPlan) -> StepPrediction:
        """The prefill chunks' strategy (as requested, or the planner's for this step's chunks and decode tokens) and,
        with a predictor, the step's predicted time."""
        requested = plan.requested
        new, cached = [n for _, n in plan.prefill], [s.num_computed for s, _ in plan.prefill]
        decoding = [s.num_computed for s, _ in plan.decode]
        if self.predictor is not None:
            return self.predictor.plan(requested, new, cached, decoding)
        if requested is None:
            return StepPrediction(DECODE_STRATEGY)
        return StepPrediction(requested if requested != "auto" else self.choose_strategy(new, cached, decoding))

    def _run(self, plan: StepPlan) -> list[Sequence]:
        """One forward pass over the plan's chunks; sample the sequences whose every token is now computed. A chunk
        of a prompt being scored (``prompt_logprobs``) brings back every position's logits, the others their last."""
        prediction = self._predict(plan)
        strategy = prediction.strategy
        prefill_tokens = plan.prefill_tokens
        predicted = ((self.predict_prefill_s(prefill_tokens) if prefill_tokens else 0.0)
                     + (self.step_s if plan.decode else 0))
        self.step_deadline_s = max(self.watchdog_floor_s, WATCHDOG_FACTOR * predicted)
        order = plan.order
        parts = plan.parts(strategy)
        whole = [seq.needs_prompt_logits for seq, _ in order]
        for chunk, all_logits in zip((c for _, chunks in parts for c in chunks), whole):
            chunk.all_logits = all_logits
        t0 = self.step_started = time.perf_counter()
        try:
            logits = self.group.step(parts)
        finally:
            self.step_started = None
        took = time.perf_counter() - t0
        if self.trace is not None:
            passes = [[name, [len(c.ids) for c in chunks]] for name, chunks in parts if chunks]
            self.trace.write(json.dumps({"t": time.time(), "pid": os.getpid(), "forward_ms": round(took * 1e3, 2),
                                         "passes": passes}) + "\n")
        if self.predictor is not None:
            self.predictor.observe(prediction, took)
        for seq, n in plan.prefill:
            seq.prefilled(strategy, n, took)
        ends = list(itertools.accumulate(n if w else 1 for (_, n), w in zip(order, whole)))  # past each chunk's rows
        if any(whole):
            self._score_prompts([(s, n, end - n) for (s, n), w, end in zip(order, whole, ends) if w], logits)
        ready, rows, prompt_only = [], [], []
        for (seq, n), end in zip(order, ends):
            self.scheduler.computed(seq, n)
            if seq.remaining == 0 and seq.params.max_tokens == 0:  # the prompt only: nothing to sample
                seq.finish("length")
                prompt_only.append(seq)
            elif seq.remaining == 0:  # its last token computed: its last row predicts the next one
                ready.append(seq)
                rows.append(end - 1)
        out = self.output.process(ready, logits[rows] if len(rows) < logits.shape[0] else logits)
        if plan.decode:  # the whole step as a decoding sequence sees it: forward, sampling, detokenizing
            took = time.perf_counter() - t0
            self.step_s = took if not self.step_s else (1 - self.STEP_EMA) * self.step_s + self.STEP_EMA * took
        return out + prompt_only

    @staticmethod
    def _score_prompts(chunks: list[tuple[Sequence, int, int]], logits: torch.Tensor) -> None:
        """Log-probs of the prompt tokens that the scored chunks' positions predict, every row at once: a chunk
        (sequence, its tokens, its first row in ``logits``) from ``seq.num_computed`` on (not yet counted); position
        j's row predicts prompt token j + 1; positions already scored (before a preemption) are skipped."""
        rows, targets, top, owners = [], [], [], []
        for seq, n, row in chunks:
            start = seq.num_computed
            for j in range(max(start, len(seq.prompt_logprobs) - 1), min(start + n, len(seq.prompt_ids) - 1)):
                rows.append(row + j - start)
                targets.append(seq.prompt_ids[j + 1])
                top.append(seq.params.prompt_logprobs)
                owners.append(seq)
        for seq, entry in zip(owners, logprobs_of(logits[rows], targets, top) if rows else ()):
            seq.prompt_logprobs.append(entry)

    def _adopt(self, adoption: Adoption) -> Sequence:
        """A prefilled sequence joins (decode-only engines): its K/V into the blocks the scheduler reserved, and the
        prefill replica's first token as its own."""
        seq, handoff = adoption
        seq.prompt_logprobs = None  # scored by the prefill replica, whose first update carried them
        self.group.take_kv([seq.blocks], handoff.kv_refs)  # <- each rank fetches its own slice
        self.scheduler.computed(seq, len(handoff.prompt_ids))
        self.output.accept(seq, handoff.first_token, logprob=handoff.first_logprob)  # may finish it (a stop string)
        return seq
