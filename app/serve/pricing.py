"""What a request would cost in one pool: pure functions of the pool's loads and its config, no Ray, no I/O.

A request is priced, per pool that can hold it, as the time to its last token: the planner's predicted prefill of
this prompt on the pool's devices, batched with the prompts already waiting there (the engine batches waiting
prompts), after the pool's expected wait for a free slot (``backlog``), plus ``max_tokens`` decode steps at the pool's
measured step time. The whole request, not its first token, so a pool that prefills sooner but decodes slower (ranks
sharing a core) does not take short requests it would finish later. A pool that probably holds the prompt's prefix in
its KV cache is priced for the rest of the prompt only, attending to the cached prefix. The planner's prefill
figures are corrected by what the pool's replicas learned from their own steps (``EngineLoad.correction``,
``cost.correction``): the same corrected predictions their engines plan with (decode steps are priced as measured);
the whole is corrected again by what this ingress's earlier requests there took against their prices
(``feedback``: the pacing, batching and interference that happen after a request is priced).

What a pool's load is comes from two places, and ``PoolLoad`` holds both: the replicas' reports on the ``LoadBoard``
(which lag by up to a beat) and what this ingress sent there itself (which misses the other ingresses' requests);
each figure takes whichever says more. Kept apart from the board and from admission so that the arithmetic can be
tested without a cluster (``tests/test_pricing.py``) and a new admission policy need not read it.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.engine.predictor import guessed_step_s
from app.engine.messages import EngineLoad
from app.engine.predictor import DECODE_CONTEXT_STEP, DECODE_LAYOUT
from cost import Hardware, decode_step_time, plan_prefill
from cost.correction import CorrectionTable, StepKey, corrected_choice
from strategies.shapes import ModelShape

if TYPE_CHECKING:
    from app.serve.config import PoolConfig

POOL_PREFIX_BLOCKS = 16384  # block hashes remembered per pool until its replicas report how many blocks they hold


@dataclass
class Route:
    """A pool priced for one request: what admission compares, and what the request is then sent with."""

    pool: PoolConfig
    predicted_s: float  # predicted time to the last token: first token (queue included), then the decode steps
    ttft_s: float = 0.0  # of which to the first token
    wait_s: float = 0.0  # of which waiting for a slot and for the prompts ahead: what max_queue_wait_s bounds
    cached_tokens: int = 0  # prompt tokens predicted to be in the pool's prefix cache
    hashes: list[int] | None = None  # the prompt's block-hash chain at the pool's block size (None: not known)
    step_s: float = 0.0  # of which each decode step after the first token
    raw: tuple[float, float] = (0.0, 0.0)  # (ttft_s, step_s) before the requests' feedback: what it learns from


@dataclass
class PoolLoad:
    """A pool's load as one ingress knows it when it prices a request."""

    front: list[EngineLoad] = field(default_factory=list)  # reports of the pool's replicas (its prefill half)
    decode: list[EngineLoad] = field(default_factory=list)  # reports of a disaggregated pool's decode half
    queued: int = 0  # prompt tokens this ingress sent there, still waiting for their first token
    inflight: Sequence[Sequence[int]] = ()  # [max_tokens, tokens seen] of each request this ingress runs there

    @property
    def decoding(self) -> list[EngineLoad]:
        """The reports of the replicas that decode the pool's requests: its decode half when disaggregated."""
        return self.decode or self.front


def correction(load: PoolLoad) -> CorrectionTable:
    """What the pool's replicas learned about the cost model on their hardware, pooled (none reported: no change)."""
    return CorrectionTable.merge(CorrectionTable(entries=x.correction) for x in [*load.front, *load.decode]
                                 if x.correction)


def _mean(loads: list[EngineLoad], get: Callable[[EngineLoad], float]) -> float:
    return statistics.fmean(get(x) for x in loads) if loads else 0.0


def backlog(pool: PoolConfig, shape: ModelShape, hardware: Hardware, load: PoolLoad) -> tuple[int, float]:
    """What a new request finds ahead of it in ``pool``: (prompt tokens waiting for prefill, seconds until a slot
    frees). From the replicas' reports (mean over replicas, plus the decode half of a disaggregated pool) or from
    what this ingress sent itself, whichever is more: the reports lag by up to a beat, and this ingress's own count
    misses the other ingresses' requests."""
    reported_tokens = _mean(load.front, lambda x: x.waiting_prompt_tokens)
    reported_slot_wait = _mean(load.front, lambda x: x.slot_wait_s) + _mean(load.decode, lambda x: x.slot_wait_s)
    replicas = max(1, len(load.decoding))
    # measured, else (no report read yet: a burst as this ingress's first requests) as the engine first guesses it
    step = _mean(load.decoding, lambda x: x.step_s) or guessed_step_s(
        shape, hardware, pool.devices, pool.max_model_len, pool.max_num_seqs)
    slots = pool.max_num_seqs * replicas
    full = len(load.inflight) >= slots
    own_slot_wait = step * sum(m - seen for m, seen in load.inflight) / slots if full else 0.0
    return max(int(reported_tokens), load.queued), max(reported_slot_wait, own_slot_wait)


def reported_pacing(load: PoolLoad) -> float:
    """Seconds the replicas say the step budget's pace adds to reading their waiting prompts, beyond a lone prefill
    of them (``EngineLoad.paced_s``: beside decoding streams), mean over replicas. Only the excess: a replica's lone
    prefill of its queue prices each prompt's fixed costs apart, which the planner's batched prefill shares, and a
    report lags by up to a beat (a prompt read since then would still count whole)."""
    return _mean(load.front, lambda x: x.paced_s)


def decode_step_s(pool: PoolConfig, shape: ModelShape, hardware: Hardware, load: PoolLoad, context: int) -> float:
    """A decode step's seconds in ``pool`` once this request joins its batch: the step its replicas measure now
    (else the planner's), scaled by the planner's step at the batch the request joins over its step at the batch the
    replicas run now, each corrected by what the replicas learned of decode steps at that batch size. The batch
    joined is the replicas' running and waiting sequences, or what this ingress runs there when it says more (a
    burst the reports have not caught up with), plus this request. Without the scaling a pool reads as fast as its
    last steps while requests pile in: a burst of 16 short prompts priced the idle 2-rank ``long`` pool by its
    one-sequence step and sent it a third of them, to decode at twice its measured step."""
    measured = load.decoding
    replicas = max(1, len(measured))
    now = max(1.0, _mean(measured, lambda x: x.running))
    joined = min(pool.max_num_seqs, max(_mean(measured, lambda x: x.running + x.waiting),
                                        len(load.inflight) / replicas) + 1)
    table = correction(load)

    def step(rows: float) -> float:
        n = max(1, round(rows))
        return table.correct(StepKey.of(DECODE_LAYOUT, "decode", n, context), planned_step_s(
            shape, hardware, pool.devices, n, context))

    if measured:
        return statistics.fmean(x.step_s for x in measured) * step(joined) / step(now)
    return step(joined)


def planned_step_s(shape: ModelShape, hardware: Hardware, devices: int, rows: int, context: int) -> float:
    """The planner's decode step of ``rows`` sequences at ``context`` tokens each, the context rounded up to
    ``DECODE_CONTEXT_STEP`` (remembered: every request prices every pool this way)."""
    context = -(-context // DECODE_CONTEXT_STEP) * DECODE_CONTEXT_STEP
    return _planned(shape.model_dump_json(), hardware.model_dump_json(), devices, rows, context)


@functools.lru_cache(maxsize=4096)
def _planned(shape: str, hardware: str, devices: int, rows: int, context: int) -> float:
    return decode_step_time(ModelShape.model_validate_json(shape), Hardware.model_validate_json(hardware), devices,
                            [context] * rows)


def prefix_capacity(load: PoolLoad) -> int:
    """Block hashes worth remembering for a pool: as many blocks as its replicas report holding."""
    return sum(x.total_blocks for x in load.front) if load.front else POOL_PREFIX_BLOCKS


def cached_tokens(matched_blocks: int, n: int, block_size: int) -> int:
    """Prompt tokens of an ``n``-token prompt a pool probably holds, its first ``matched_blocks`` blocks sent there:
    the engine always computes at least the prompt's last token."""
    return min(matched_blocks * block_size, (n - 1) // block_size * block_size)


def predicted_ttft(pool: PoolConfig, shape: ModelShape, hardware: Hardware, load: PoolLoad, n: int, strategy: str,
                   available: list[str], cached: int = 0) -> tuple[float, float] | None:
    """(seconds to this request's first token, of which waiting): its ``n - cached`` uncached tokens, attending
    to the ``cached`` prefix, prefill in one batch with the prompts ahead (the engine batches waiting prompts),
    after a slot frees. ``strategy``: ``auto`` or one of ``available`` (what the pool built at start). None: it
    cannot run this prompt in the pool's memory."""
    queued, slot_wait = backlog(pool, shape, hardware, load)
    new, table = n - cached, correction(load)
    try:
        alone = corrected_choice(plan_prefill(shape, hardware, pool.devices, new, available=available, cached=cached),
                                 table, "prefill", new, cached)
        own = alone.predicted_s.get(alone.strategy if strategy == "auto" else strategy)
        if own is None:
            return None
        batched = (corrected_choice(plan_prefill(shape, hardware, pool.devices, [new, queued], available=available,
                                                 cached=[cached, 0]), table, "prefill", new + queued, cached)
                   if queued else alone)
    except ValueError:  # nothing the pool offers fits its memory for this prompt (or this batch)
        return None
    # the prompts ahead: batched with this one as the planner prices them, plus what the step budget's pace beside
    # decoding streams adds to reading them, as the replicas report it (``LLMEngine.prefill_wait_s``)
    ahead = batched.time_s - alone.time_s + reported_pacing(load)
    wait = max(0.0, ahead) + slot_wait
    return own + wait, wait


def first_token_key(pool: str, new: int, cached: int) -> StepKey:
    """How requests' first tokens are told apart when learning from them (``feedback``): by pool and the log2 buckets
    of their uncached and cached prompt tokens."""
    return StepKey.of(pool, "prefill", new, cached)


def decode_key(pool: str) -> StepKey:
    """… and their time per output token: by pool."""
    return StepKey.of(pool, "decode", 1, 0)


def price(pool: PoolConfig, shape: ModelShape, hardware: Hardware, load: PoolLoad, n: int, max_tokens: int,
          strategy: str, available: list[str], cached: int = 0, hashes: list[int] | None = None,
          learned: CorrectionTable | None = None) -> Route | None:
    """The request (``n`` prompt tokens, ``cached`` of them probably in the pool's prefix cache, then
    ``max_tokens``) in ``pool``: its first token, then ``max_tokens - 1`` decode steps at half the new tokens'
    context, each corrected by what earlier requests took against their prices (``learned``: ``feedback``). The
    wait is not: it is what admission holds to ``max_queue_wait_s``, and a refusal answers for the queue the replicas
    report, not for a learned ratio (one learned under a burst, from first tokens predicted at a tenth of a second,
    refused a healthy pool's requests). None: the pool's memory cannot prefill it (by ``strategy``)."""
    predicted = predicted_ttft(pool, shape, hardware, load, n, strategy, available, cached)
    if predicted is None:
        return None
    ttft, wait = predicted
    step = decode_step_s(pool, shape, hardware, load, n + max_tokens // 2)
    raw = (ttft, step)
    if learned is not None and learned.entries:
        late = learned.factor(first_token_key(pool.name, n - cached, cached))
        ttft, step = ttft * late, learned.correct(decode_key(pool.name), step)
    return Route(pool=pool, predicted_s=ttft + (max_tokens - 1) * step, ttft_s=ttft, wait_s=wait,
                 cached_tokens=cached, hashes=hashes, step_s=step, raw=raw)
