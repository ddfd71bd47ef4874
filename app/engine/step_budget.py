"""Each step's prefill tokens sized by the pool's TPOT target, not by a fixed token count.

A fixed ``max_num_batched_tokens`` bounds how long a long prompt stalls the streams decoding beside it only by what
that many tokens cost on this hardware, with this layout, this batch and this cached prefix: 1,024 tokens were a 2 s
step on the shipped 2-core ``long`` pool (12.7x its median inter-token gap). Here the step is sized by time instead:
a chunk gets the most tokens whose *predicted* step (the predictor's, so the layout it would pick for that chunk,
the decode tokens riding along, the chunk's cached prefix, and the online correction learned from the steps this
engine measured) stays within ``share`` of the TPOT target. Chunk length and layout are chosen together: each
candidate length is priced over every contender and takes its fastest (corrected) layout. With no stream decoding
there is no inter-token time to protect: the chunk is as long as the cap allows (the token-sharded layouts pay on
long chunks). ``max_num_batched_tokens`` stays the upper bound, and a waiting prompt always gets one block per step
even when the streams alone already miss the target, so it never starves.

A prompt has a promise too: with a TTFT target (a pool's ``slo.ttft_s``), a prompt is due its first token by that
target or by ``SLOWDOWN`` times its predicted lone prefill, whichever is later (``due_s``), and its chunk is at least
what reads its remaining tokens by then at one step per TPOT target (``deadline_floor``); once the deadline is within
a step or past, the rest up to the cap. TPOT is a mean over a stream's tokens, TTFT a one-off deadline: a few longer
steps cost each stream a little of its mean, while one block per step held a 1,500-token prompt on the shipped 2-rank
pool for 30 s beside four streams (its decode step alone nearly filled the target). The slowdown bound keeps a
target no replica meets for a long prompt (1 s for 1,000 tokens alone taking 9 s) from reading it at the cap at once.

Sizing must cost little next to the step (a planner call is ~1.5 ms here): pricing is cached by shape
(``StepPredictor._plan_step``) and the shapes are coarsened upwards, so the prediction errs long, never short (the
decode contexts to their mean rounded up to ``RIDE_STEP``, the chunk's prefix up to a multiple of ``PREFIX_STEP``,
candidates block multiples); the search starts from the last answer (two cached lookups in steady decoding). Only the
correction is applied fresh each time.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable

from app.engine.predictor import StepPredictor

RIDE_STEP = 64  # the riding decode tokens' contexts priced at their mean, rounded up to this
PREFIX_STEP = 256  # a chunk's cached prefix priced at the next multiple of this
STEP_SHARE = 0.85  # of the TPOT target a step's forward pass may take (sampling, detokenizing, the loop: the rest)
SLOWDOWN = 2.0  # a prompt beside streams is due within this many times its lone prefill (or its TTFT target if later)


class StepBudget:
    """Sizes prefill chunks for ``predictor``'s engine so decoding streams keep ``tpot_s`` between their tokens;
    chunks are multiples of ``block_size`` (the minimum chunk) or a prompt's whole remainder."""

    def __init__(self, predictor: StepPredictor, tpot_s: float, block_size: int, share: float = STEP_SHARE,
                 ttft_s: float | None = None):
        self.predictor, self.tpot_s, self.ttft_s, self.block_size = predictor, tpot_s, ttft_s, block_size
        self.target_s = tpot_s * share
        self.sized = 0  # chunks sized (with streams decoding), and the seconds spent sizing them: the overhead
        self.sizing_s = 0.0
        self._last: dict[tuple[str, int], int] = {}  # blocks of the last chunk per (layout asked, decode tokens)
        self.last_chunk: int | None = None  # tokens of the last chunk the budget cut beside decoding streams
        self._alone: dict[int, tuple[float, tuple[int, int]]] = {}  # lone prefill by coarse length, when learned

    def limit(self, requested: str, new: list[int], cached: list[int], decoding: list[int], prefix: int,
              remaining: int, cap: int, first: bool, waited_s: float | None = None) -> int:
        """Prompt tokens for the next chunk of a prompt with ``prefix`` tokens computed and ``remaining`` to go, in a
        step that already holds chunks ``new`` (after ``cached``) and decode tokens at contexts ``decoding``: at most
        ``cap`` (what is left of ``max_num_batched_tokens``). ``first``: no chunk in the step yet (it gets at least
        a block, so prompts always progress). ``waited_s``: how long the prompt has waited for its first token (None:
        it has one, e.g. recomputed after a preemption): with a TTFT target, at least its ``deadline_floor``."""
        top = min(remaining, cap)
        if not decoding or top <= 0:
            return max(top, 0)
        t0 = time.perf_counter()
        riding = [math.ceil(sum(decoding) / len(decoding) / RIDE_STEP) * RIDE_STEP] * len(decoding)
        priced_prefix, bs = coarse_prefix(prefix), self.block_size

        def fits(tokens: int) -> bool:
            p = self.predictor.plan(requested, [*new, tokens], [*cached, priced_prefix], riding)
            return p.corrected_s <= self.target_s  # 0: the planner has no figure (nothing fits its memory model)

        key = (requested, len(decoding))
        most = top // bs  # block multiples up to the cap; the prompt's whole remainder when it is shorter
        m = largest(lambda blocks: fits(blocks * bs), min(self._last.get(key, 1), most), most)
        if most:
            self._last[key] = max(1, m)
        n = top if m == most and top % bs and fits(top) else m * bs
        if n == 0 and first:
            n = min(bs, top)
        if (left := self.due_in_s(prefix + remaining, waited_s)) is not None:
            n = max(n, min(top, deadline_floor(remaining, left, self.tpot_s, bs)))
        if 0 < n < remaining:  # cut by the budget or the cap (a prompt's last piece says nothing of the budget)
            self.last_chunk = n
        self.sized += 1
        self.sizing_s += time.perf_counter() - t0
        return n

    def due_in_s(self, prompt_tokens: int, waited_s: float | None) -> float | None:
        """Seconds until a prompt of ``prompt_tokens`` that has waited ``waited_s`` for its first token is due it
        (negative: overdue); None when it is not hurried (no TTFT target, or it has its first token)."""
        return None if self.ttft_s is None or waited_s is None else self.due_s(prompt_tokens) - waited_s

    def due_s(self, prompt_tokens: int) -> float:
        """Seconds after its arrival a prompt of ``prompt_tokens`` is due its first token: the TTFT target, or
        ``SLOWDOWN`` times its predicted (corrected) lone prefill when that is later. The prefill is priced at the
        length rounded up to ``PREFIX_STEP``, and again whenever the correction learned from another lone prefill
        (what this figure rests on: a pool that mostly decodes runs few) or from another ``PREFIX_STEP`` steps."""
        table = self.predictor.correction.table()
        lone = table.entries.get("prefill", (0.0, 0))[1]
        key, learned = coarse_prefix(prompt_tokens), (table.steps() // PREFIX_STEP, lone)
        alone, at = self._alone.get(key, (0.0, None))
        if at != learned:
            alone = self.predictor.prefill_s(key)
            self._alone[key] = (alone, learned)
        return max(self.ttft_s or 0.0, SLOWDOWN * alone)

    def paced_wait_s(self, prompts: list[tuple[int, int, float | None]], streams: list[int],
                     alone: Callable[[int], float]) -> float:
        """Seconds until the waiting ``prompts`` are read, beside ``streams`` (``paced_wait_s``, at this budget's last
        chunk and TPOT target, each prompt by its deadline); ``alone`` prices a lone prefill. Before the budget has cut
        a prompt (prompts were read whole so far), every prompt is read alone."""
        return paced_wait_s(prompts, streams, self.last_chunk or 0, self.tpot_s, alone, self.block_size)

    def overhead_ms(self) -> float:
        """Mean milliseconds spent sizing one chunk so far."""
        return 1e3 * self.sizing_s / self.sized if self.sized else 0.0


def paced_wait_s(prompts: list[tuple[int, int, float | None]], streams: list[int], chunk: int, tpot_s: float,
                 alone: Callable[[int], float], block_size: int = 16) -> float:
    """Seconds until ``prompts`` ([prompt tokens still to read, tokens it will then generate, seconds from now until
    its first token is due (None: not hurried)], in the order the scheduler reads them) are read, beside ``streams``
    (tokens each decoding sequence may still generate): while any stream decodes, each step reads ``chunk`` tokens in
    ``tpot_s`` (the budget holds the step to the target) and every stream gains a token, unless the prompt's deadline
    needs more (``deadline_floor``): then a step reads that many, taking at least a lone prefill of them; with no
    stream, a prompt is read at a lone prefill's speed, ``alone(tokens)``. A prompt read becomes a stream itself (its
    first token came with its last chunk). Streams are taken to run to their ``max_tokens`` (EOS may end them sooner:
    the wait errs long). ``chunk`` 0: the budget has not cut a prompt yet, every prompt is priced alone."""
    left = sorted(s for s in streams if s > 0)
    t = 0.0
    for tokens, generates, due_in in prompts:
        while tokens > 0:
            if not left or chunk <= 0:
                t, tokens = t + alone(tokens), 0
                break
            due = 0 if due_in is None else deadline_floor(tokens, due_in - t, tpot_s, block_size)
            if due > chunk:  # hurried: one step at a time, as long as its chunk takes alone at least
                t, tokens, steps = t + max(tpot_s, alone(due)), tokens - due, 1
            else:  # paced: until the prompt is read or the next stream ends (the deadline, once met, stays met)
                steps = min(-(-tokens // chunk), left[0])
                t, tokens = t + steps * tpot_s, tokens - steps * chunk
            left = [s - steps for s in left if s > steps]
        if generates > 1:
            bisect.insort(left, generates - 1)
    return t


def deadline_floor(remaining: int, left_s: float, tpot_s: float, block_size: int) -> int:
    """The fewest tokens (whole blocks) a chunk must read so ``remaining`` prompt tokens are read within ``left_s``
    at one step per ``tpot_s``; all of them when the deadline is within a step or past (the later, the worse)."""
    steps = int(left_s // tpot_s)
    if steps <= 1:
        return remaining
    return min(remaining, -(-remaining // (steps * block_size)) * block_size)


def coarse_prefix(prefix: int) -> int:
    """``prefix`` rounded up to a multiple of ``PREFIX_STEP``: a prompt read in chunks re-prices a new prefix only
    every ``PREFIX_STEP`` tokens, and its attention is priced at most that many tokens long."""
    return -(-prefix // PREFIX_STEP) * PREFIX_STEP


def largest(fits: Callable[[int], bool], start: int, most: int) -> int:
    """The largest ``m`` in [0, ``most``] with ``fits(m)`` (0 when none; ``fits`` grows false with ``m``), searched
    from ``start`` (the last answer): two probes when it holds, a doubling then a bisection when it moved."""
    if most <= 0:
        return 0
    if fits(start):
        lo, step = start, 1
        while lo < most and fits(min(lo + step, most)):
            lo, step = min(lo + step, most), step * 2
        hi = min(lo + step, most + 1) - 1  # fits(lo) holds, fits(hi + 1) does not (or beyond most)
    else:
        lo, hi = 0, start - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
