"""Throughput and admission under load: real Serve, real HTTP and gRPC clients, one small app for the module.

The app has one 1-device pool (tiny chat model, 4 sequences at once) that admits a request only while its expected
wait before prefill is under ``max_queue_wait_s`` = 1 s; Serve's own queue caps are set far above, so what refuses
work here is the admission control, and what is admitted must be served.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc
import httpx
import pytest
from conftest import delete_app, deployed, grpc_stub, http_client, metric_samples

from app.engine.messages import RequestError

APP, ROUTE, MODEL, POOL = "admission", "/adm", "tiny-chat", "one"
MAX_QUEUE_WAIT_S = 1.0
META = (("application", APP),)


# -- the admission rule alone (no Ray): priced offers in, a route or the reason for none out ----------------------------


def offers_for(**routes):
    """An ``AppConfig`` with pools ``a``, ``b``, ... and their offers: a pool's value is its ``(predicted_s, wait_s)``,
    or an ``Offer`` field (``unpriced``, ``runs``, ``queued_tokens``) dict, or None (its memory cannot prefill)."""
    from app.serve.admission import Offer
    from app.serve.config import AppConfig
    from app.serve.pricing import Route

    cfg = AppConfig.model_validate({"pools": [dict(name=name, max_queued_tokens=1000) for name in routes],
                                    "max_queue_wait_s": 2.0})
    offers = []
    for pool, value in zip(cfg.pools, routes.values()):
        if isinstance(value, dict):
            offers.append(Offer(pool=pool, **value))
        else:
            route = None if value is None else Route(pool=pool, predicted_s=value[0], wait_s=value[1])
            offers.append(Offer(pool=pool, route=route, runs=["megatron"]))
    return cfg, offers


def test_admission_picks_the_earliest_finish_among_pools_within_the_limits():
    from app.serve.admission import Admission

    cfg, offers = offers_for(a=(3.0, 0.5), b=(2.0, 0.1), c=(1.0, 2.5), d=(0.5, 0.0))
    offers[3].queued_tokens = 990  # 990 + 20 tokens would pass d's max_queued_tokens
    assert Admission(cfg).choose(20, "auto", offers).pool.name == "b"  # c waits too long, d holds too many tokens
    cfg, offers = offers_for(a=(1.0, 0.0), b=(1.0, 0.0))
    assert Admission(cfg).choose(20, "auto", offers).pool.name == "a"  # equals: the one listed first


def test_a_prompt_short_of_a_pools_min_prompt_tokens_goes_there_only_when_no_other_pool_admits_it():
    """Requests classed by length: ``long`` (min_prompt_tokens) is for prompts of its length; a shorter one goes to
    the other pools even when ``long`` would finish it first, and to ``long`` only when none of them admits it."""
    from app.serve.admission import Admission

    def choose(a: tuple[float, float], b: tuple[float, float], overflow: bool) -> str:
        cfg, offers = offers_for(short=a, long=b)
        offers[1].overflow = overflow
        return Admission(cfg).choose(64, "auto", offers).pool.name

    assert choose((9.0, 1.0), (5.0, 0.0), overflow=True) == "short"  # long would finish first: not its class
    assert choose((9.0, 1.0), (5.0, 0.0), overflow=False) == "long"  # a prompt of its length: the earliest finish
    assert choose((9.0, 2.5), (5.0, 0.0), overflow=True) == "long"  # short would queue past max_queue_wait_s
    cfg, offers = offers_for(short={"unpriced": "down"}, long=(5.0, 0.0))
    offers[1].overflow = True
    assert Admission(cfg).choose(64, "auto", offers).pool.name == "long"  # short's replicas failed


def test_a_pool_queued_past_its_ttft_objective_spills_to_one_that_meets_its_own():
    """While a pool waits for its scale-up, its queue pushes the first token past ``slo.ttft_s`` although it would
    finish first; a pool with room that meets its own objective takes the request meanwhile, and nothing else
    changes: without a timely pool, when the prompt alone misses the objective, or when the pool cannot grow (at its
    ``max_replicas``), the earliest finish wins."""
    from app.serve.admission import Admission
    from app.serve.config import AppConfig
    from app.serve.pricing import Route

    slo = dict(autoscaling=dict(policy="slo", min_replicas=1, max_replicas=2))
    cfg = AppConfig.model_validate({"pools": [dict(name="fast", slo=dict(ttft_s=1.0), **slo),
                                              dict(name="cheap", slo=dict(ttft_s=1.0), **slo)],
                                    "max_queue_wait_s": 30.0})
    fast, cheap = cfg.pools

    def choose(fast_ttft: float, fast_wait: float, cheap_ttft: float, grows: bool = True) -> str:
        from app.serve.admission import Offer
        offers = [Offer(pool=fast, route=Route(pool=fast, predicted_s=fast_ttft + 2.0, ttft_s=fast_ttft,
                                               wait_s=fast_wait), grows=grows),
                  Offer(pool=cheap, route=Route(pool=cheap, predicted_s=cheap_ttft + 6.0, ttft_s=cheap_ttft))]
        return Admission(cfg).choose(20, "auto", offers).pool.name

    assert choose(0.3, 0.0, 0.8) == "fast"  # both timely: the earliest finish
    assert choose(3.3, 3.0, 0.8) == "cheap"  # fast is late by its queue alone: spill
    assert choose(3.3, 3.0, 1.5) == "fast"  # nobody meets the objective: the earliest finish
    assert choose(3.3, 0.0, 0.8) == "fast"  # fast's prompt alone misses it, no queue to wait out: earliest finish
    assert choose(3.3, 3.0, 0.8, grows=False) == "fast"  # at its max_replicas: its queue is not waited out, no spill


def test_admission_says_why_nothing_admits_the_request():
    from app.engine.messages import EngineFailed
    from app.serve.admission import Admission
    from app.serve.errors import Overloaded, ShuttingDown

    cfg, offers = offers_for(a=(9.0, 6.0), b={"unpriced": "down"})
    with pytest.raises(Overloaded, match="max_queue_wait_s of 2 s \\(at least 6.0 s now\\)") as e:
        Admission(cfg).choose(20, "auto", offers)
    assert e.value.retry_after_s == 4
    cfg, offers = offers_for(a={"unpriced": "down"}, b={"unpriced": "starting"})
    with pytest.raises(EngineFailed, match="the replicas of pool a failed"):
        Admission(cfg).choose(20, "auto", offers)
    cfg, offers = offers_for(a={"queued_tokens": 999})
    with pytest.raises(Overloaded, match="queued-token limit"):
        Admission(cfg).choose(20, "auto", offers)
    with pytest.raises(ShuttingDown):
        Admission.open(draining=True)
    Admission.open(draining=False)


def test_admission_blames_the_client_only_when_no_pool_could_ever_run_the_request():
    from app.serve.admission import Admission

    cfg, offers = offers_for(a=None, b={"unpriced": "unbuilt", "runs": ["megatron"]})
    with pytest.raises(RequestError, match="'weight_gathered' cannot run this request in any pool whose context holds "
                       "it: pool b did not build it at start \\(it runs 'megatron'\\); pool a lacks the memory to "
                       "prefill 20 tokens this way; name one of those"):
        Admission(cfg).choose(20, "weight_gathered", offers)
    cfg, offers = offers_for(a=None, b={"unpriced": "starting"})  # b may run it once it is up: not the client's fault
    with pytest.raises(Exception) as e:
        Admission(cfg).choose(20, "auto", offers)
    assert not isinstance(e.value, RequestError)


@pytest.fixture(scope="module")
def adm(serve_session, chat_tiny):
    pool = dict(name=POOL, devices=1, max_num_seqs=4, max_model_len=512, max_ongoing_requests=256,
                max_queued_requests=1024)
    args = {"model": chat_tiny, "served_model_name": MODEL, "pools": [pool], "graceful_shutdown_s": 1,
            "max_queue_wait_s": MAX_QUEUE_WAIT_S, "request_timeout_s": 120, "shared_weights": False}
    with deployed(serve_session, args, APP, ROUTE) as ports:
        yield ports


@pytest.fixture(scope="module")
def http(adm):
    with http_client(adm, ROUTE) as client:
        yield client


def replica_info() -> dict:
    from ray import serve

    return serve.get_deployment_handle(POOL, APP).info.remote().result(timeout_s=30)


async def fire(port: int, n: int, max_tokens: int, concurrency: int | None = None,
               timeout_s: float = 180) -> list[tuple[int, float, httpx.Response | None]]:
    """``n`` non-streaming requests (``concurrency`` at a time, default all at once): (status, seconds, response);
    status 0 for a client timeout."""
    limit = asyncio.Semaphore(concurrency or n)
    body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}

    async def one(c: httpx.AsyncClient):
        async with limit:
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{ROUTE}/v1/completions", json=body)
                return r.status_code, time.perf_counter() - t0, r
            except httpx.TimeoutException:
                return 0, time.perf_counter() - t0, None

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout_s, limits=limits) as c:
        return await asyncio.gather(*(one(c) for _ in range(n)))


@pytest.mark.slow
def test_a_flood_is_served_or_refused_at_once_never_left_hanging(adm, http):
    results = asyncio.run(fire(adm["http"], 120, 48))
    statuses = [s for s, _, _ in results]
    served = [t for s, t, _ in results if s == 200]
    refused = [(t, r) for s, t, r in results if s == 503]
    assert set(statuses) <= {200, 503}, statuses  # no client timeout, no other error
    assert len(served) >= 8 and refused, (len(served), len(refused))
    assert all(r.json()["usage"]["completion_tokens"] == 48 for s, _, r in results if s == 200)
    for t, r in refused:  # refused at once, saying why and when to come back
        assert t < 10 and int(r.headers["retry-after"]) >= 1
        assert "max_queue_wait_s" in r.json()["error"]["message"]
    # admitted work is bounded by the wait it was admitted with: the longest served request is far under the
    # client's 180 s
    assert max(served) < 60, max(served)
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200  # healthy after
    assert replica_info()["seqs_in_use"] == 0


def test_the_replica_computes_on_a_core_it_claimed_alone(adm):
    """A one-device pool of a whole core: its replica's process (the device) is pinned to one core whose claim it
    holds, so the OS does not time-slice it with the service's other processes (placement/cores.py)."""
    import fcntl

    from placement.cores import claims_dir

    pid = replica_info()["pids"][0]
    cores = os.sched_getaffinity(pid)
    assert len(cores) == 1, f"the replica runs on {sorted(cores)}, not on one core of its own"
    with open(claims_dir() / f"core{min(cores)}.lock") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: by the replica, as long as it lives


def test_concurrency_raises_throughput(adm):
    """The same 16 requests one at a time and 4 at a time (the pool's max_num_seqs, so none waits before prefill and
    admission has no reason to refuse one, however slow the machine): batching in the engine must survive the
    service."""
    asyncio.run(fire(adm["http"], 4, 32, concurrency=4))  # warm
    t0 = time.perf_counter()
    one = asyncio.run(fire(adm["http"], 16, 32, concurrency=1))
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    four = asyncio.run(fire(adm["http"], 16, 32, concurrency=4))
    concurrent = time.perf_counter() - t0
    failed = [(s, r.text if r is not None else None) for s, _, r in one + four if s != 200]
    assert not failed, failed
    assert concurrent < 0.75 * sequential, (concurrent, sequential)  # ~0.25 in the engine; unbatched would be ~1


def test_grpc_is_resource_exhausted_when_http_would_be_503(adm):
    """Keep the pool busy with long requests; whenever HTTP is refused, gRPC asked right then is refused too, with
    RESOURCE_EXHAUSTED and the same reason (never another error)."""
    from app.serve.protos import dynpart_pb2 as pb

    stop = threading.Event()

    def keep_busy() -> None:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 400, "ignore_eos": True}
        with httpx.Client(base_url=f"http://127.0.0.1:{adm['http']}", timeout=120) as c:
            while not stop.is_set():
                c.post(f"{ROUTE}/v1/completions", json=body)

    threads = [threading.Thread(target=keep_busy, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    codes = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{adm['http']}", timeout=30) as c, grpc_stub(adm) as stub:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and grpc.StatusCode.RESOURCE_EXHAUSTED not in codes:
                r = c.post(f"{ROUTE}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 8})
                assert r.status_code in (200, 503), r.text
                if r.status_code != 503:
                    time.sleep(0.1)
                    continue
                try:
                    stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=8), metadata=META, timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                    assert "max_queue_wait_s" in e.details()
                    codes.append(e.code())
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    deadline = time.monotonic() + 60
    while replica_info()["seqs_in_use"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replica_info()["seqs_in_use"] == 0


@pytest.mark.slow
def test_a_replica_the_cluster_cannot_place_is_counted_not_silent(serve_session, ray_session, chat_tiny):
    """A pool asking for a resource no node has: its replica stays STARTING, and the app's board exports that, so a
    scale-up that cannot be placed shows in the metrics (and, after 30 s, in the log) instead of pending silently."""
    from ray import serve

    from app.serve.app import build_app

    pools = [dict(name="stuck", devices=1, max_num_seqs=2, max_model_len=256, resources={"no_such_node": 1})]
    args = {"model": chat_tiny, "pools": pools, "shared_weights": False, "graceful_shutdown_s": 1}
    serve._run(build_app(args), _blocking=False, name="unplaceable", route_prefix="/unplaceable")

    def starting() -> float:
        return sum(s.value for s in metric_samples(ray_session, "ray_dynpart_replicas")
                   if s.name == "ray_dynpart_replicas" and s.labels.get("application") == "unplaceable"
                   and s.labels.get("serve_deployment") == "stuck" and s.labels.get("state") == "STARTING")

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and starting() < 1:
            time.sleep(1)
        assert starting() >= 1
    finally:
        delete_app("unplaceable")
