"""Faults under load: each fault injected while 16 streams run; every request accounted for, none cut silently.

Two faults whose requests are retried by different paths: a shard worker dead (the engine names its replica, which
routers then skip) and the replica's actor dead (Serve's router drops it). The suite runs the first (its budget is
12 minutes on 2 cores); ``DYNPART_CHAOS_FAULTS=worker,replica pytest -s tests/test_chaos.py`` runs both, and ``make
chaos`` runs these and the rest (a hung worker, a killed ingress, clients leaving, a redeploy) on SmolLM2 for
RELIABILITY.md; ``tests/test_faults.py`` checks the watchdog that catches a hung worker.

One app for the module: the tiny chat model on one pool of two replicas of 2 CPU devices (gloo), 4 sequences each
and 8 requests per replica at most (so of 16 streams, 8 run and 8 wait inside the replicas when a fault hits),
behind two ingress replicas; a 1 s health check, a 2 s step-watchdog floor. A redeploy under load, which replaces
every replica, is in ``make chaos`` (too slow for the suite on 2 cores). ``load_tests.chaos`` drives the load
and classifies how each request ended (RELIABILITY.md runs the same faults on SmolLM2 with ``make chaos``).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from conftest import delete_app

from load_tests.chaos import STREAMS, hang_pool, kill, under_load, whole_again

APP, ROUTE, MODEL, POOL = "chaos", "/chaos", "tiny-chat", "a"
BODY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
WATCHDOG_FLOOR_S = 2.0

pytestmark = pytest.mark.slow
FAULTS = os.environ.get("DYNPART_CHAOS_FAULTS", "worker,hung-pool").split(",")


POOL_ARGS = dict(name=POOL, devices=2, num_replicas=2, max_num_seqs=4, max_model_len=512, max_ongoing_requests=8,
                 max_queued_requests=16, health_check_period_s=1, collective_timeout_s=10,
                 step_watchdog_floor_s=WATCHDOG_FLOOR_S, prefill_layouts="named")
HUNG = "b"  # a second pool, hung whole by the hung-pool test while pool a serves
HUNG_ARGS = {**POOL_ARGS, "name": HUNG, "num_replicas": 1, "max_num_seqs": 2}
ARGS = {"model": None, "served_model_name": MODEL, "pools": [POOL_ARGS, HUNG_ARGS], "ingress_replicas": 2,
        "graceful_shutdown_s": 5, "max_tokens_limit": 256, "request_timeout_s": 120}
PIN = {"x-dynpart-pool": POOL}  # the load goes to pool a


@pytest.fixture(scope="module")
def chaos(serve_session, chat_tiny):
    """The app, deployed while ``/v1/models`` is polled: the first 200 must come only once every pool's engine
    replicas run and have reported (warmed up), so a client's first request does not wait for an engine."""
    import threading

    import httpx
    from ray import serve

    from app.serve.app import build_app

    ARGS["model"] = chat_tiny
    base = f"http://127.0.0.1:{serve_session['http']}{ROUTE}"
    deploying = threading.Thread(target=serve.run, args=(build_app(ARGS),), kwargs={"name": APP, "route_prefix": ROUTE})
    deploying.start()
    try:
        with httpx.Client(base_url=base, timeout=5) as client:  # one client for the polls (each builds an SSL context)
            while True:
                try:
                    if client.get("/v1/models").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert deploying.is_alive() or client.get("/v1/models").status_code == 200, "never ready"
                time.sleep(0.1)
            for pool, replicas in ((POOL, 2), (HUNG, 1)):  # up and warmed: they answer now (an engine starts >10 s)
                whole_again(APP, pool, replicas, limit_s=5)
            health = client.get("/health").json()
        assert health["status"] == "ok" and health["pools"][HUNG]["replicas"] == 1, health
        deploying.join()
        yield base
    finally:
        deploying.join()
        delete_app(APP)


def run(base: str, name: str, fault, **kw):
    """The fault under load once the pool is whole; afterwards the pool must be whole again, holding no KV block."""
    infos = whole_again(APP, POOL, 2)
    report = asyncio.run(under_load(base, lambda: fault(infos), name, BODY, PIN, fault_when_started=8, **kw))
    after = whole_again(APP, POOL, 2)
    report.blocks_after = sum(i["seqs_in_use"] for i in after)
    counts = report.counts
    print(f"{name}: {dict(counts)}, retried {report.retried}, first error {report.first_error_s}, served again "
          f"{report.served_again_s}")
    for e in report.ended:
        if e.message:
            print(f"  {e.outcome} after {e.after_fault_s}: {e.message[:300]}")
    assert len(report.ended) == STREAMS
    assert counts["cut"] == 0 and counts["hung"] == 0, report.ended  # every stream ended honestly
    assert report.served_again_s is not None and report.blocks_after == 0
    return report, infos


@pytest.mark.skipif("worker" not in FAULTS, reason="runs with DYNPART_CHAOS_FAULTS=worker")
def test_a_killed_shard_worker_fails_only_its_streams_and_retries_those_not_started(chaos):
    """SIGKILL rank 1 of one replica while 8 streams run and 8 wait: the victim's running streams end with an error
    event, its waiting ones are started again on the other replica and finish, the other replica's finish."""
    report, _ = run(chaos, "SIGKILL a shard worker", lambda infos: kill(infos[0]["pids"][-1]))
    c = report.counts
    assert 1 <= c["error event"] <= 4 and c["error status"] == 0, c  # only the victim's running streams
    assert report.retried >= 1 and c["finished"] == STREAMS - c["error event"], (report.retried, c)
    assert report.first_error_s < 10


@pytest.mark.skipif("replica" not in FAULTS, reason="runs with DYNPART_CHAOS_FAULTS=worker,replica (and make chaos)")
def test_a_killed_engine_replica_fails_only_its_streams(chaos):
    """SIGKILL one engine replica's process (its actor dies, its workers with it)."""
    report, _ = run(chaos, "kill an engine replica", lambda infos: kill(infos[0]["pids"][0]))
    c = report.counts
    assert 1 <= c["error event"] <= 4 and report.retried >= 1, (report.retried, c)
    assert c["finished"] == STREAMS - c["error event"], c


@pytest.mark.skipif("hung-pool" not in FAULTS, reason="runs with DYNPART_CHAOS_FAULTS=hung-pool")
def test_a_hung_pool_leaves_the_others_serving_and_serves_again_once_replaced(chaos):
    """Every shard worker of pool b SIGSTOPped (a hung GPU, a stuck collective) while 16 streams run on pool a and
    small requests keep coming to a. Of 12 requests sent to b as it hangs, those running get their 503 (the step
    watchdog) and those waiting in the ingress's request router (b takes 8) are answered one way or the other; every
    request to a is answered throughout (a hung pool once wedged the ingress's request routing for every pool: its
    router spun on the failed replica), /health answers from the load board at once (degraded, not a timeout), and
    b serves again once Serve replaced its replica."""
    hung = whole_again(APP, HUNG, 1)
    pids = hung[0]["pids"][1:]  # the replica's shard workers (pids[0] is the replica's own process, rank 0)
    outcome = []
    report = asyncio.run(under_load(chaos, lambda: outcome.append(hang_pool(chaos, pids, BODY, HUNG, burst=12)),
                                    "hang a whole pool", BODY, PIN, fault_when_started=8, probe=True))
    hung_pool = outcome[0]
    print(f"{report.counts}, meanwhile {dict(report.during)}; {hung_pool.row()}")
    assert report.counts["finished"] == STREAMS, report.ended  # pool a's streams
    assert report.during and set(report.during) == {200}, report.during  # pool a answered every request meanwhile
    assert sum(hung_pool.burst.values()) == 12 and set(hung_pool.burst) <= {200, 503}, hung_pool  # none hung
    assert hung_pool.burst[503] >= 8, hung_pool  # those running when it hung (max_ongoing_requests 8)
    assert hung_pool.served_again_s is not None, hung_pool
    assert hung_pool.slowest_health_s < 2.0 and hung_pool.health["degraded"] >= 1, hung_pool
    assert set(hung_pool.health) <= {"ok", "degraded"}, hung_pool
