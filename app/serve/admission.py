"""Admission: of the pools priced for a request, which one takes it, or why none does, decided at once.

A request is refused at once rather than accepted and left to time out: a pool whose expected wait passes
``max_queue_wait_s``, or whose prompt tokens waiting (sent from this ingress) would pass its ``max_queued_tokens``,
takes nothing. Of the rest, a pool whose ``min_prompt_tokens`` the prompt is short of is left for when no other
admits it, and of those left the one predicted to finish the request first wins (ties go to the pool listed first),
except that a pool whose queue alone would push the first token past its ``slo.ttft_s`` is passed over while another
pool meets its own, if it may still add a replica (``cost.growth.spill``: a pool waiting for its scale-up spills to
one with room meanwhile).
With none left the answer says why, as the client needs it: the client's mistake (no pool built the layout it named,
or none has the memory to prefill the prompt: 400), overload (503 with ``retry-after``), every pool's replicas
failed (503), and while the app drains, shutting down (503).

This is the one place such a rule lives: the router prices every pool that can hold the request (``pricing``) and
hands over the ``Offer``s; a new admission policy (another limit, a priority, a fairness rule) changes this module
only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.engine.messages import EngineFailed, RequestError
from app.serve.config import AppConfig, PoolConfig
from app.serve.errors import Overloaded, ShuttingDown
from app.serve.metrics import set_expected_wait
from app.serve.pricing import Route
from cost.growth import Option, spill


@dataclass
class Offer:
    """One pool that can hold the request (prompt + max_tokens within its context), as the router found it."""

    pool: PoolConfig
    route: Route | None = None  # priced; None: not priced (``unpriced`` says why) or its memory cannot prefill it
    unpriced: Literal["starting", "down", "unbuilt"] | None = None  # starting: other pools are warm, this one is not;
    # down: avoided, or its replicas failed; unbuilt: it did not build the layout the request names
    runs: list[str] | None = None  # the layouts the pool built at start, when known
    queued_tokens: int = 0  # prompt tokens this ingress sent there, still waiting for their first token
    grows: bool = True  # the pool may still add a replica (below its max_replicas): its queue is one to wait out
    overflow: bool = False  # the prompt is shorter than the pool's min_prompt_tokens: only if no other pool admits it


class Admission:
    def __init__(self, cfg: AppConfig):
        self.cfg = cfg

    @staticmethod
    def open(draining: bool) -> None:
        """Before anything is asked of a pool: while the app drains before it stops, ``ShuttingDown`` (503)."""
        if draining:
            raise ShuttingDown("this server is shutting down: it finishes the requests it holds and takes no new ones; "
                               "retry against another server")

    def choose(self, n: int, strategy: str, offers: list[Offer]) -> Route:
        """The route predicted to finish the ``n``-token request first among the pools that admit it; none: the
        error that says why (``RequestError``, ``Overloaded``, ``EngineFailed``), at once."""
        admitted: list[Offer] = []
        waits: list[float] = []
        no_memory: list[str] = []  # pools whose memory cannot prefill this prompt (by ``strategy``)
        for o in offers:
            if o.unpriced or o.queued_tokens + n > o.pool.max_queued_tokens:
                continue
            if o.route is None:
                no_memory.append(o.pool.name)
                continue
            set_expected_wait(o.pool.name, o.route.wait_s)
            if o.route.wait_s > self.cfg.max_queue_wait_s:
                waits.append(o.route.wait_s)
                continue
            admitted.append(o)
        if admitted:  # of the pools for its length (else any), where it finishes first, unless queued past its TTFT
            admitted = [o for o in admitted if not o.overflow] or admitted
            routes: list[Route] = [o.route for o in admitted]  # type: ignore[misc]  # priced: not None
            return routes[spill([Option(r.ttft_s, r.wait_s, r.predicted_s, r.pool.slo and r.pool.slo.ttft_s, o.grows)
                                 for r, o in zip(routes, admitted)])]
        pinned = strategy != "auto"
        if not [o for o in offers if o.pool.name not in no_memory
                and (not pinned or o.runs is None or strategy in o.runs)]:
            why = [*(f"pool {o.pool.name} did not build it at start (it runs {', '.join(map(repr, o.runs))})"
                     for o in offers if o.unpriced == "unbuilt"),
                   *(f"pool {name} lacks the memory to prefill {n} tokens" + (" this way" if pinned else "")
                     for name in no_memory)]
            unbuilt = any(o.unpriced == "unbuilt" for o in offers)
            raise RequestError((f"prefill strategy {strategy!r} cannot" if pinned else "no prefill strategy can")
                               + f" run this request in any pool whose context holds it: {'; '.join(why)}"
                               + ("; name one of those, or none to let the planner choose" if unbuilt else ""))
        if waits:
            least = min(waits)
            raise Overloaded(f"every pool that can serve this request would queue it for longer than this "
                             f"server's max_queue_wait_s of {self.cfg.max_queue_wait_s:g} s (at least "
                             f"{least:.1f} s now); retry later", retry_after_s=least - self.cfg.max_queue_wait_s)
        down = [o.pool.name for o in offers if o.unpriced == "down"]
        if len(down) == len([o for o in offers if o.unpriced != "starting"]):
            raise EngineFailed(f"the replicas of pool {', '.join(down)} failed; Serve is replacing them")
        raise Overloaded("every pool that can serve this request is at its queued-token limit; retry later")
