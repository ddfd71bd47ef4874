"""A device as Ray sees it: the bundle one device reserves, the actor options that take exactly one, and how long the
devices of one replica wait for each other.

Without torch (the ingress and the config read these; a shard worker is ``workers.py``).
"""

from __future__ import annotations

DEVICE_RESOURCE = "dynpart_device"  # custom resource a CPU-only node offers per emulated device
COLLECTIVE_TIMEOUT_S = 60.0  # a collective waiting longer for a peer rank fails (the peer is hung or gone)


def default_bundle() -> dict:
    """One device: a GPU where the cluster has GPUs, otherwise a tenth of a CPU (emulated device)."""
    import ray

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"CPU": 0.1, "GPU": 1}
    if ray.cluster_resources().get(DEVICE_RESOURCE, 0) >= 1:
        return {"CPU": 0.1, DEVICE_RESOURCE: 1}
    return {"CPU": 0.1}


def actor_resources(bundle: dict) -> dict:
    """``.options(...)`` that make an actor take exactly one device ``bundle``."""
    return {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0),
            "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}}
