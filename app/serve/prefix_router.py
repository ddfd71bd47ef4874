"""Prefix-aware routing: send a prompt where the KV blocks of its prefix are likely cached.

Each engine replica keeps the full KV blocks of recent prompts in its prefix cache, keyed by a hash chain
(``app.engine.blocks.prefix_hashes``), and a prompt whose first blocks are cached there computes only the rest. Serve's
default router (power of two random choices) and a cost-only pool picker know nothing of that, so requests sharing a
system prompt spread over every replica and each recomputes it. As Ray Serve LLM's PrefixCacheAffinityRouter and
NVIDIA Dynamo's KV router do, the caller remembers where it sent each chain (``PrefixIndex``: per replica or pool, a
bounded LRU of block hashes) and prefers the holder of the longest matching prefix:

* within a pool, ``PrefixAffinityRouter`` (a Serve ``RequestRouter``, configured on a pool's engine and prefill
  deployments by ``prefix_router_config``) picks among the pool's replicas, unless that replica's queue is clearly
  longer than the least loaded one's (then the default power of two choices: affinity must not pile a popular
  prefix onto one replica);
* between pools, ``app.serve.router.Router`` asks its own index how much of a prompt a pool probably holds and prices
  only the rest.

The index is the caller's memory, not the replicas' caches: it is per ingress replica, and a replica may have
evicted what it was sent. A wrong guess costs one prefill, as without prefix routing.

The same router keeps requests off failed replicas (``app.serve.failed_replicas``): an engine replica whose engine
stopped stays in Serve's replica set until its next health check and looks idle (it refuses at once), so the power of
two choices would even prefer it. Decode deployments use this router too (their calls carry no prompt: random two).
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from app.engine.blocks import prefix_hashes
from app.serve import failed_replicas  # a module, so the router (pickled by value by Serve) shares the process's set

REPLICA_PREFIX_BLOCKS = 16384  # block hashes remembered per replica (256K tokens at 16 per block)
IMBALANCE_THRESHOLD = 4  # requests more than the least loaded candidate beyond which affinity gives way


class PrefixIndex:
    """Where block-hash chains were sent: per holder (a replica, a pool), an LRU of the hashes, at most ``capacity``.

    A chain is recorded tail first, so its root is the most recent entry and a chain is evicted from its tail: what a
    holder keeps of a chain is always a prefix of it, as in the engine's own cache."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._held: dict[Hashable, OrderedDict[int, int]] = {}
        self._clock = itertools.count(1)

    def record(self, holder: Hashable, hashes: Sequence[int]) -> None:
        if not hashes:
            return
        held = self._held.setdefault(holder, OrderedDict())
        stamp = next(self._clock)
        for h in reversed(hashes):
            held[h] = stamp
            held.move_to_end(h)
        self._trim(held)

    def resize(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        for held in self._held.values():
            self._trim(held)

    def _trim(self, held: OrderedDict[int, int]) -> None:
        while len(held) > self.capacity:
            held.popitem(last=False)

    def forget(self, holder: Hashable) -> None:
        self._held.pop(holder, None)

    def holders(self) -> set[Hashable]:
        return set(self._held)

    def matched(self, holder: Hashable, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` were sent to ``holder`` (and not evicted here since)."""
        held = self._held.get(holder)
        n = 0
        while held and n < len(hashes) and hashes[n] in held:
            n += 1
        return n

    def longest(self, hashes: Sequence[int], holders: Sequence[Hashable]) -> tuple[Hashable | None, int]:
        """(the holder among ``holders`` sent the longest prefix of ``hashes``, its blocks); of equals, the one that
        received it most recently. (None, 0) when none holds even the first block."""
        best, best_key = None, (0, 0)
        for holder in holders:
            n = self.matched(holder, hashes)
            if n and (key := (n, self._held[holder][hashes[n - 1]])) > best_key:
                best, best_key = holder, key
        return best, best_key[0]


def affine_replica(index: PrefixIndex, hashes: Sequence[int], candidates: Sequence[Hashable],
                   queue_len: Callable[[Hashable], int | None], threshold: float) -> Hashable | None:
    """The candidate holding the longest prefix of ``hashes``, unless its queue is more than ``threshold`` requests
    longer than the shortest known one (then None: balance the load instead). An unknown queue length is no reason
    to give up affinity (Serve probes the chosen replica before sending)."""
    best, _ = index.longest(hashes, candidates)
    if best is None:
        return None
    mine = queue_len(best)
    known = [q for q in map(queue_len, candidates) if q is not None]
    if mine is not None and mine - min(known) > threshold:
        return None
    return best


def prompt_of(args: Sequence[Any]) -> list[int] | None:
    """The prompt's token ids when a call's first argument is one (generate, generate_whole, prefill); else None
    (a decode call's ``Handoff``, ``info``)."""
    first = args[0] if args else None
    if isinstance(first, list) and first and isinstance(first[0], int):
        return first
    return None


class PrefixAffinityRouter(RequestRouter):
    """Serve request router of a pool's engine, prefill and decode replicas: a prompt goes to the replica this caller
    most recently sent its longest known prefix, while that replica's queue is within ``imbalance_threshold`` requests
    of the least loaded candidate's; other calls, prompts with no known prefix, and imbalanced cases get the power of
    two random choices (Serve then takes the shorter queue of the two). Failed replicas are never chosen."""

    def initialize_state(self, block_size: int = 16, imbalance_threshold: float = IMBALANCE_THRESHOLD,
                         max_blocks_per_replica: int = REPLICA_PREFIX_BLOCKS) -> None:
        """Called by Serve with ``request_router_kwargs``: the pool's KV block size (hashes must match the engine's)
        and the bounds."""
        self.block_size, self.imbalance_threshold = block_size, imbalance_threshold
        self.index = PrefixIndex(max_blocks_per_replica)

    def hashes(self, pending_request: PendingRequest | None) -> list[int]:
        prompt = prompt_of(pending_request.args) if pending_request is not None else None
        return prefix_hashes(prompt, self.block_size) if prompt else []

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas to try in turn: the affine replica alone first (Serve skips it if its queue is full),
        then two at random; never a replica known to have failed (none left: Serve waits for a replacement).

        Every answer asks Serve to back off before it calls again: without ``should_backoff`` Serve's routing loop
        calls this again at once, and an empty answer (every replica failed) or full replicas made it spin without
        ever yielding the one router event loop that every handle of this process shares, so no request to any pool
        was routed again (and the replacement replica Serve announced was never read)."""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        candidate_replicas = failed_replicas.FAILED.healthy(candidate_replicas)
        if not candidate_replicas:
            return []
        fallback = [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        hashes = self.hashes(pending_request)
        if not hashes:
            return fallback
        by_id = {r.replica_id: r for r in candidate_replicas}
        chosen = affine_replica(self.index, hashes, list(by_id), self.replica_queue_len_cache.get,
                                self.imbalance_threshold)
        return fallback if chosen is None else [[by_id[chosen]], *fallback]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """A replica accepted the request: its prefix will be cached there."""
        self.index.record(replica_id, self.hashes(pending_request))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Forget replicas that left (scaled down, replaced): their caches went with them."""
        super().update_replicas(replicas)
        for gone in self.index.holders() - {r.replica_id for r in replicas}:
            self.index.forget(gone)


def prefix_router_config(block_size: int) -> RequestRouterConfig:
    """``request_router_config`` of each of a pool's deployments (a decode call carries no prompt: only the failed
    replicas are skipped)."""
    return RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                               request_router_kwargs={"block_size": block_size})
