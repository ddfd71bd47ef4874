"""The router's own predictions corrected by what its requests took: a pool priced as it actually serves.

A route is priced from the replicas' reports (``pricing``): the planner's prefill of the prompt, corrected by the
steps the engines measured, behind the prompts waiting there, then decode steps at the step time the replicas
measure now. What that misses is what happens to the request *after* it is priced: a prompt read beside decoding
streams is paced by the step budget, more requests join the batch it decodes in, a busy pool slows the processes
beside it. Measured on the shipped config (64-token prompts, concurrency 16): requests the router sent to the 2-rank
``long`` pool took 1.5x their predicted time (first token 4.7 s against 1.7 s predicted), those on ``short`` 1.07x,
so ``long`` kept looking cheaper than it was and took half the requests at a third of ``short``'s speed.

So each finished request is a labelled sample too, as each engine step is for the engines (``cost.correction``, the
same learner: per key the median of recent log ratios, shrunk toward the coarser levels): its first token against
the route's predicted first token, keyed by pool and the log2 buckets of its uncached and cached prompt tokens, and
its time per output token against the route's predicted decode step, keyed by pool. ``pricing.price`` multiplies the
next predictions by the learned factors, so a pool whose requests keep finishing later than priced is priced later,
and admission's choice and the spill rule read the corrected figures; a route's wait is left as the replicas report
it, since admission refuses by it (``max_queue_wait_s``). Per ingress, in memory: it describes the load of the moment,
which a restart does not carry over.
"""

from __future__ import annotations

from app.serve.pricing import decode_key, first_token_key
from cost.correction import Correction, CorrectionTable


class RouteFeedback:
    """Learns from finished requests (``observe``); ``table`` is what ``pricing.price`` corrects with."""

    def __init__(self) -> None:
        self.correction = Correction()

    def observe(self, pool: str, new: int, cached: int, raw_ttft_s: float, raw_step_s: float,
                ttft_s: float | None, tpot_s: float | None) -> None:
        """A request routed to ``pool`` with these uncorrected predictions (first token; seconds per decode step)
        ended having taken ``ttft_s`` to its first token and ``tpot_s`` per token after it (None: not measured)."""
        if ttft_s is not None:
            self.correction.observe(first_token_key(pool, new, cached), raw_ttft_s, ttft_s)
        if tpot_s is not None:
            self.correction.observe(decode_key(pool), raw_step_s, tpot_s)

    def table(self) -> CorrectionTable:
        return self.correction.table()
