"""Where a replica's shard workers meet (issue 23, item 9): ranks on one node rendezvous on loopback with gloo pinned to
``lo``, exactly as before; ranks whose bundles span nodes (``placement_strategy: PACK`` on a cluster whose nodes each
hold fewer devices than a replica) meet at rank 0's node address, gloo on the interface that holds each rank's node
address.

The end-to-end check builds a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, one device per
node, both nodes at this machine's non-loopback address as nodes of a real cluster would be), so a PACK placement
group of two devices spans both nodes; it needs its own Ray, so it runs in a subprocess (this file run as a script)
and never touches the test session's Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from placement.collectives import gloo_interface, interface_of
from placement.workers import LOOPBACK, rendezvous


def machine_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    import socket

    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_one_node_meets_on_loopback_and_gloo_stays_on_lo():
    def never():
        raise AssertionError("rank 0's node is not asked when every bundle is on one node")

    addr, port = rendezvous(["node-1", "node-1", "node-1"], never)
    assert addr == LOOPBACK and 0 < port < 65536
    assert gloo_interface(addr, None) == "lo"


def test_ranks_on_several_nodes_meet_at_rank_0s_node_address():
    assert rendezvous(["node-1", "node-2"], lambda: ("10.1.2.3", 4567)) == ("10.1.2.3", 4567)
    here = machine_address()
    if here is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert gloo_interface(here, here) == interface_of(here) not in (None, "lo")


@pytest.mark.slow
@pytest.mark.own_ray
def test_a_pack_group_spanning_two_nodes_runs(tiny_models):
    here = machine_address()
    if here is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    out = subprocess.run([sys.executable, __file__, tiny_models["gqa"], here], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(__file__), env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(got)
    assert got["bundle_nodes"][0] != got["bundle_nodes"][1], got  # the two ranks are on two nodes
    assert got["master_addr"] == got["rank0_node_ip"] == here, got  # they meet at rank 0's node address
    interface = interface_of(here)
    assert got["gloo_ifname"] == [interface, interface] and interface != "lo", got  # gloo not pinned to loopback
    assert got["max_abs_diff"] <= 1e-4, got  # the two ranks' Megatron prefill equals one device's


def main(model: str, node_ip: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, placement_group_table
    from test_partitioned import runner_kwargs

    from placement.bundles import DEVICE_RESOURCE
    from placement.workers import LocalGroup, ShardGroup, local_ray_options
    from strategies.kv_cache import Chunk

    local_ray_options()  # the environment a local Ray needs here (token auth off)
    node = dict(num_cpus=1, resources={DEVICE_RESOURCE: 1}, node_ip_address=node_ip)
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **node))
    cluster.add_node(**node)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        bundle = {"CPU": 0.1, DEVICE_RESOURCE: 1}
        pg = placement_group([bundle] * 2, strategy="PACK")  # one device per node: PACK spreads over both
        ray.get(pg.ready(), timeout=120)
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        kwargs = runner_kwargs(model)
        group = ShardGroup(2, kwargs, placement_group=pg, bundle=bundle)
        rank0_ip = ray.get(group.workers[0].__ray_call__.remote(lambda self: ray.util.get_node_ip_address()))
        gloo = [ray.get(w.__ray_call__.remote(lambda self: os.environ.get("GLOO_SOCKET_IFNAME")))
                for w in group.workers]
        prompt = [Chunk(list(range(1, 12)), 0, [0, 1, 2])]
        logits = group.call("forward", prompt, "megatron", True)
        single = LocalGroup(**kwargs).call("forward", prompt, "megatron", True)
        group.shutdown()
        print(json.dumps({"bundle_nodes": [nodes[i] for i in sorted(nodes)], "rank0_node_ip": rank0_ip,
                          "master_addr": group.master_addr, "gloo_ifname": gloo,
                          "max_abs_diff": (logits - single).abs().max().item()}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
