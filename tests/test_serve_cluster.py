"""Pools map to Ray resources, and a pool survives the loss of another pool's node.

On a two-node cluster (``ray.cluster_utils.Cluster`` on this machine) whose nodes offer different pool resources, each
pool's replica — and so its placement group and shard workers — lands on its node. Then the node holding pool ``b`` is
removed: pool ``a`` keeps serving every request that fits it (all answered 200); once the loss is noticed (Serve
counts no running replica of b), a request pinned to ``b`` is refused at once with 503 (not left waiting for a replica
that is not coming); and ``b`` serves again once a node offering its resource joins. The ingress and the load board
are pinned to the head node (``ingress_resources``).

The cluster needs its own Ray, so the check runs in a subprocess (this file run as a script) and never touches the
test session's Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.own_ray
def test_each_pool_lands_on_the_node_offering_its_resources(chat_tiny, tmp_path):
    out = subprocess.run([sys.executable, __file__, chat_tiny], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(__file__), env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    placed = json.loads(out.stdout.strip().splitlines()[-1])
    for pool, resource in (("a", "pool_a"), ("b", "pool_b")):
        assert resource in placed["node_resources"][placed["replica_node"][pool]], placed
        assert placed["status"][pool] == [200, pool]
    assert placed["replica_node"]["a"] != placed["replica_node"]["b"]
    lost = placed["node_loss"]
    print("node loss:", lost)
    assert lost["before"].get("b") == 2 and sum(lost["before"].values()) == 4, lost
    assert lost["after"] == {"a": 10} and lost["statuses"] == {"200": 14}, lost  # a serves all, none lost
    assert lost["b_refused_after_s"] is not None, lost  # the loss is noticed
    assert lost["pinned_to_b"] == 503 and lost["pinned_s"] < 2, lost  # then refused at once, explicitly
    assert lost["b_back_s"] is not None, lost  # b serves again once a node offering pool_b joins


def main(model: str) -> None:
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from app.serve.app import build_app
    from placement.bundles import DEVICE_RESOURCE
    from placement.workers import free_port, local_ray_options

    local_ray_options()  # the environment a local Ray needs here (token auth off)
    # a node is declared dead after 3 missed 1 s health checks (Ray's default: 5 missed 3 s ones)
    fast_health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, resources={"pool_a": 2, DEVICE_RESOURCE: 2, "head": 1}, include_dashboard=False,
        _system_config=fast_health))
    node_b = cluster.add_node(num_cpus=1, resources={"pool_b": 2, DEVICE_RESOURCE: 2})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        pools = [dict(name=n, devices=d, resources={f"pool_{n}": 1}, max_num_seqs=2, max_model_len=256,
                      cpus_per_device=0.4, health_check_period_s=1) for n, d in (("a", 1), ("b", 2))]
        serve.run(build_app({"model": model, "pools": pools, "graceful_shutdown_s": 1,
                             "ingress_resources": {"head": 0.01}}), name="cluster", route_prefix="/")
        nodes = {n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}
        replica_node, status = {}, {}
        for pool in ("a", "b"):
            replica_node[pool] = serve.get_deployment_handle(pool, "cluster").info.remote().result()["node"]
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"x-dynpart-pool": pool}, timeout=60,
                           json={"model": model, "prompt": "Hi", "max_tokens": 2})
            status[pool] = [r.status_code, r.headers.get("x-dynpart-pool")]
        node_loss = lose_node_b(cluster, node_b, f"http://127.0.0.1:{port}", model)
        serve.shutdown()
        print(json.dumps({"replica_node": replica_node, "node_resources": nodes, "status": status,
                          "node_loss": node_loss}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def lose_node_b(cluster, node_b, url: str, model: str) -> dict:
    """Node b (pool b's replica and workers) is removed; then unpinned requests (which both pools fit) and one pinned
    to b are sent; then a node offering pool_b joins. Returns the pools that answered before and after the loss, every
    status, how the pinned request ended and how long it took, and how long b took to serve again."""
    import time

    import httpx

    from placement.bundles import DEVICE_RESOURCE

    body = {"model": model, "prompt": "Hello there", "max_tokens": 2}
    statuses: dict[str, int] = {}
    client = httpx.Client()  # one for every request: each new client builds an SSL context (~25 ms of CPU)

    def one(counts: dict[str, int] | None = None, pool: str | None = None, timeout: float = 60) -> int | str:
        try:
            r = client.post(f"{url}/v1/completions", json=body, headers={"x-dynpart-pool": pool} if pool else {},
                            timeout=timeout)
        except httpx.HTTPError as e:
            return type(e).__name__
        if counts is not None:
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                counts[r.headers["x-dynpart-pool"]] = counts.get(r.headers["x-dynpart-pool"], 0) + 1
        return r.status_code

    before: dict[str, int] = {}
    for pool in ("b", "b", None, None):
        one(before, pool)
    cluster.remove_node(node_b, allow_graceful=False)
    t0 = time.monotonic()
    after: dict[str, int] = {}
    while sum(after.values()) < 10 and time.monotonic() - t0 < 120:
        if one(after) != 200:
            time.sleep(0.5)
    # A request pinned to b: until Ray and Serve notice the node is gone (its processes may linger), it can wait;
    # from then on it is refused at once (503), not left waiting for a replica that is not coming.
    pinned, refused_s = None, None
    while refused_s is None and time.monotonic() - t0 < 120:
        pinned = one(pool="b", timeout=5)
        if pinned == 503:
            refused_s = time.monotonic() - t0
    t = time.monotonic()
    again = one(pool="b")
    pinned_s = time.monotonic() - t
    cluster.add_node(num_cpus=1, resources={"pool_b": 2, DEVICE_RESOURCE: 2})
    t1, back = time.monotonic(), None
    while back is None and time.monotonic() - t1 < 180:
        if one(pool="b") == 200:
            back = time.monotonic() - t1
        else:
            time.sleep(1)
    client.close()
    return {"before": before, "after": after, "statuses": statuses, "b_refused_after_s": refused_s,
            "pinned_to_b": again, "pinned_s": pinned_s, "b_back_s": back}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(sys.argv[1])
