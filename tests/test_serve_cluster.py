"""Pools map to Ray resources: on a two-node cluster (``ray.cluster_utils.Cluster`` on this machine) whose nodes offer
different pool resources, each pool's replica — and so its placement group and shard workers — lands on its node.

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
def test_each_pool_lands_on_the_node_offering_its_resources(chat_tiny, tmp_path):
    out = subprocess.run([sys.executable, __file__, chat_tiny], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(__file__), env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    placed = json.loads(out.stdout.strip().splitlines()[-1])
    for pool, resource in (("a", "pool_a"), ("b", "pool_b")):
        assert resource in placed["node_resources"][placed["replica_node"][pool]], placed
        assert placed["status"][pool] == [200, pool]
    assert placed["replica_node"]["a"] != placed["replica_node"]["b"]


def main(model: str) -> None:
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from app.serve.app import build_app
    from placement.workers import DEVICE_RESOURCE, free_port, local_ray_options

    local_ray_options()  # the environment a local Ray needs here (token auth off)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, resources={"pool_a": 2, DEVICE_RESOURCE: 2}, include_dashboard=False))
    cluster.add_node(num_cpus=1, resources={"pool_b": 2, DEVICE_RESOURCE: 2})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        pools = [dict(name=n, devices=d, resources={f"pool_{n}": 1}, max_num_seqs=2, max_model_len=256,
                      cpus_per_device=0.4) for n, d in (("a", 1), ("b", 2))]
        serve.run(build_app({"model": model, "pools": pools, "graceful_shutdown_s": 1}), name="cluster",
                  route_prefix="/")
        nodes = {n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}
        replica_node, status = {}, {}
        for pool in ("a", "b"):
            replica_node[pool] = serve.get_deployment_handle(pool, "cluster").info.remote().result()["node"]
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"x-dynpart-pool": pool}, timeout=60,
                           json={"model": model, "prompt": "Hi", "max_tokens": 2})
            status[pool] = [r.status_code, r.headers.get("x-dynpart-pool")]
        serve.shutdown()
        print(json.dumps({"replica_node": replica_node, "node_resources": nodes, "status": status}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(sys.argv[1])
