"""Prefix-aware routing: within a pool (``PrefixAffinityRouter``) and between pools (``Router.pick_pool``).

The unit tests run the choice logic without Serve: the prefix index (longest match, recency, LRU bound), the
replica router itself constructed bare, and the pool pricing with fake handles. The end-to-end tests share one small
app of the tiny chat model: pool ``a`` with two 1-device replicas and pool ``b`` with one, all idle; prompts are token
ids (a 200-token shared prefix: 12 full blocks of 16) so the expected cache hit is exact.
"""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import pytest
from conftest import deployed, http_client
from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve._private.request_router.common import RequestRoutingContext
from ray.serve.request_router import ReplicaID

from app.engine.blocks import prefix_hashes
from app.engine.messages import Handoff
from app.serve import failed_replicas
from app.serve.load import REPORT_S
from app.serve.prefix_router import PrefixAffinityRouter, PrefixIndex, affine_replica

BS = 16
APP, ROUTE, MODEL = "prefix-routing", "/prefix", "tiny-chat"
# The pools price a prompt by the cost model alone (as test_serve_api's): each replica's online correction, learned from
# steps a few ms long on the tiny model, would make two idle pools price a new prompt differently
POOL = dict(devices=1, cpus_per_device=0.4, max_num_seqs=4, max_model_len=512, block_size=BS, online_correction=False)


def chain(tokens: list[int]) -> list[int]:
    return prefix_hashes(tokens, BS)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 49152) for _ in range(n)]


# -- the index and the choice, without Serve ---------------------------------------------------------------------------


def test_longest_prefix_wins_then_the_most_recent():
    index = PrefixIndex(capacity=100)
    shared = tokens(64, 0)
    index.record("r1", chain(shared[:32]))  # two blocks of the prefix
    index.record("r2", chain(shared))  # all four
    index.record("r3", chain(tokens(64, 1)))  # another prompt
    assert index.longest(chain(shared + tokens(20, 2)), ["r1", "r2", "r3"]) == ("r2", 4)
    assert index.longest(chain(shared), ["r1", "r3"]) == ("r1", 2)  # r2 not a candidate (e.g. full, gone)
    assert index.longest(chain(tokens(64, 3)), ["r1", "r2", "r3"]) == (None, 0)
    index.record("r1", chain(shared))  # now r1 holds all four too, and more recently
    assert index.longest(chain(shared), ["r1", "r2"]) == ("r1", 4)
    assert index.matched("r3", chain(shared)) == 0


def test_index_is_bounded_and_evicts_chain_tails_first():
    index = PrefixIndex(capacity=6)
    old, new = tokens(64, 0), tokens(64, 1)
    index.record("r", chain(old))
    index.record("r", chain(new))  # 8 hashes > 6: the old chain's last two blocks go
    assert index.matched("r", chain(old)) == 2 and index.matched("r", chain(new)) == 4
    index.resize(3)
    assert index.matched("r", chain(old)) == 0 and index.matched("r", chain(new)) == 3
    index.forget("r")
    assert index.holders() == set()


def test_imbalance_gives_up_affinity():
    index = PrefixIndex(capacity=100)
    prompt = chain(tokens(48, 0))
    index.record("hot", prompt)
    queues = {"hot": 5, "cold": 2}
    assert affine_replica(index, prompt, ["hot", "cold"], queues.get, threshold=4) == "hot"
    queues["hot"] = 7  # 5 more than the least loaded
    assert affine_replica(index, prompt, ["hot", "cold"], queues.get, threshold=4) is None
    assert affine_replica(index, prompt, ["hot", "cold"], {}.get, threshold=4) == "hot"  # lengths unknown


def test_serve_router_prefers_the_replica_that_got_the_prefix():
    """The real ``RequestRouter`` subclass, constructed as Serve does but without a cluster: ranks it returns, what it
    records when a replica accepts a request, and calls that carry no prompt."""
    deployment = DeploymentID(name="a", app_name=APP)
    router = PrefixAffinityRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN,
                                  use_replica_queue_len_cache=True)
    router.initialize_state(block_size=BS, imbalance_threshold=2)
    replicas = [SimpleNamespace(replica_id=ReplicaID(f"r{i}", deployment), max_ongoing_requests=8) for i in range(3)]
    ids = [r.replica_id for r in replicas]
    prefix = tokens(200, 0)
    call = lambda prompt: SimpleNamespace(args=[prompt, {"max_tokens": 4}, "auto"], kwargs={},  # noqa: E731
                                          routing_context=RequestRoutingContext())

    async def ranks(request) -> list[list]:
        return [[r.replica_id for r in rank] for rank in await router.choose_replicas(replicas, request)]

    first = asyncio.run(ranks(call(prefix + [1, 2, 3])))
    assert len(first) == 1 and len(first[0]) == 2  # nothing known: two at random
    router.on_request_routed(call(prefix + [1, 2, 3]), ids[1], None)
    for i, q in enumerate((0, 1, 0)):
        router.on_new_queue_len_info(ids[i], q)
    follow = asyncio.run(ranks(call(prefix + [7, 8, 9, 10])))
    assert follow[0] == [ids[1]] and len(follow) == 2  # the affine replica, then the random pair if it is full
    router.on_new_queue_len_info(ids[1], 3)  # 3 more than the least loaded: past the threshold of 2
    assert len(asyncio.run(ranks(call(prefix + [7, 8, 9, 10])))) == 1
    handoff = Handoff(prompt_ids=prefix, first_token=5, kv_refs=[])
    decode = SimpleNamespace(args=[handoff, {}], kwargs={}, routing_context=RequestRoutingContext())
    assert len(asyncio.run(ranks(decode))) == 1  # decode: default routing
    assert decode.routing_context.should_backoff  # Serve backs off before it asks again: never a spin (#23)
    failed_replicas.FAILED.add(ids[0].unique_id), failed_replicas.FAILED.add(ids[2].unique_id)
    try:  # a failed replica is never chosen
        assert {r for rank in asyncio.run(ranks(call(prefix))) for r in rank} <= {ids[1]}
    finally:
        failed_replicas.FAILED._ids.clear()
    router.on_replica_actor_died(ids[1])
    assert router.index.holders() == set()


def test_pool_pricing_credits_the_cached_prefix(chat_tiny):
    """Two equal pools: the one this ingress sent the prefix to is priced for the uncached tail only, attending to
    the cached blocks, and wins; a prompt given only as a count gets no credit (config order decides)."""
    from app.serve.config import AppConfig
    from app.serve.dispatch import PoolHandles
    from app.serve.router import Router
    from cost import plan_prefill

    async def info():
        return {"available": ["megatron"]}

    fake = SimpleNamespace(info=SimpleNamespace(remote=info))
    cfg = AppConfig.model_validate({"model": chat_tiny, "pools": [dict(name="a", **POOL), dict(name="b", **POOL)]})
    router = Router(cfg, {"a": PoolHandles(engine=fake), "b": PoolHandles(engine=fake)})
    prefix = tokens(200, 0)
    router.dispatch.prefixes["b"].record("b", chain(prefix))  # what ``run`` records when it sends a request to ``b``
    prompt = prefix + tokens(10, 1)

    async def picks():
        return await router.pick_pool(prompt, 1), await router.pick_pool(len(prompt), 1), \
            await router.pick_pool(tokens(210, 2), 1)

    hit, counted, fresh = asyncio.run(picks())
    assert (hit.pool.name, hit.cached_tokens) == ("b", 192)
    b = cfg.pool("b")
    expected = plan_prefill(router.shape, router.hardware["b"], 1, 18, available=["megatron"], cached=192)
    assert hit.ttft_s == pytest.approx(expected.time_s)
    assert (counted.pool.name, counted.cached_tokens) == ("a", 0)
    assert (fresh.pool.name, fresh.cached_tokens) == ("a", 0)
    assert hit.ttft_s < fresh.ttft_s and b.block_size == BS


# -- end to end --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(serve_session, chat_tiny):
    pools = [dict(name="a", num_replicas=2, **POOL), dict(name="b", **POOL)]
    args = {"model": chat_tiny, "served_model_name": MODEL, "pools": pools, "graceful_shutdown_s": 1,
            "shared_weights": False}
    with deployed(serve_session, args, APP, ROUTE) as ports, http_client(ports, ROUTE) as client:
        yield client


def complete(http, prompt: list[int], pool: str | None = None) -> tuple[str, int]:
    """(pool, cached prompt tokens) of one greedy one-token completion. One token: the pools' predictions then differ
    only in prefill (measured decode steps vary between replicas by noise)."""
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0},
                  headers={"x-dynpart-pool": pool} if pool else {})
    assert r.status_code == 200, r.text
    return r.headers["x-dynpart-pool"], r.json()["usage"]["dynpart"]["cached_tokens"]


def test_follow_ups_reach_the_replica_holding_the_prefix(http):
    """Pool ``a`` has two replicas: after one request with a 200-token prefix, every follow-up with that prefix and a
    new tail finds its 12 full blocks cached, i.e. reached the same replica (by chance: 1 in 2 per request)."""
    prefix = tokens(200, 10)
    assert complete(http, prefix + tokens(8, 11), pool="a") == ("a", 0)
    for i in range(5):
        assert complete(http, prefix + tokens(8 + i, 20 + i), pool="a") == ("a", 192)


def test_follow_ups_go_to_the_pool_that_served_the_prefix(http):
    """``a`` and ``b`` price alike for a new prompt (ties go to ``a``, listed first); once ``b`` served a prefix,
    unpinned follow-ups with it go to ``b``, and find it cached there.

    Each follow-up comes a second after the answer before it, as a conversation's next turn does: a replica reports
    its load on a beat (``REPORT_S``), so for up to a beat after an answer the board may still show that request's
    prompt waiting at ``b``, and a follow-up sent within it is priced behind it there (two fresh-clone runs sent one
    to ``a`` so)."""
    prefix = tokens(200, 30)
    assert complete(http, prefix + tokens(8, 31), pool="b") == ("b", 0)
    for i in range(3):
        time.sleep(4 * REPORT_S)
        assert complete(http, prefix + tokens(8 + i, 40 + i)) == ("b", 192)
    pool, cached = complete(http, tokens(208, 50))  # a new prefix: either pool
    assert pool in ("a", "b") and cached == 0
