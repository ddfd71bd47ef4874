"""One copy of each rank's weight shards per node, shared by every replica on that node through the object store.

Without it each replica's rank r reads and copies its own shards: two replicas of a pool hold two copies. Here a
detached actor per node (``WeightStore``) loads rank r's shards once, ``ray.put``s them as numpy arrays, and hands
out the reference; workers ``ray.get`` it zero-copy (the arrays map the node's shared-memory object store) and wrap
them as read-only tensors. On GPUs the tensors are then copied to the device: sharing saves host memory and loading.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import torch

from strategies.dtypes import DTYPES, dtype_name
from strategies.loader import Checkpoint
from strategies.sharding import LayerShard, RankWeights, load_rank_weights

NAMESPACE = "dynpart"


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: such tensors travel as int16 bit patterns."""
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _to_torch(a: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    with warnings.catch_warnings():  # the array is read-only shared memory; nothing writes to weights
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t if torch.device(device).type == "cpu" else t.to(device)


def pack(w: RankWeights) -> dict[str, Any]:
    """RankWeights → plain arrays and metadata (what goes into the object store)."""
    return {
        "rank": w.rank, "offsets": w.offsets, "tied": w.lm_head is w.embed,
        "embed": _to_numpy(w.embed), "lm_head": None if w.lm_head is w.embed else _to_numpy(w.lm_head),
        "final_norm": _to_numpy(w.final_norm),
        "layers": [(_to_numpy(x.flat), _to_numpy(x.attn_norm), _to_numpy(x.mlp_norm)) for x in w.layers],
    }


def unpack(d: dict[str, Any], ckpt: Checkpoint, devices: int, dtype: torch.dtype,
           device: torch.device | str) -> RankWeights:
    from strategies.sharding import head_layout

    def t(a: np.ndarray) -> torch.Tensor:
        return _to_torch(a, dtype, device)

    embed = t(d["embed"])
    return RankWeights(
        shape=ckpt.shape, layout=head_layout(ckpt.shape, devices), rank=d["rank"],
        layers=[LayerShard(flat=t(f), attn_norm=t(a), mlp_norm=t(m)) for f, a, m in d["layers"]],
        embed=embed, lm_head=embed if d["tied"] else t(d["lm_head"]), final_norm=t(d["final_norm"]),
        offsets=d["offsets"],
    )


def _return_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class WeightStore:
    """Per-node actor: loads each (model, devices, rank, dtype) shard set once and keeps it in the object store."""

    def __init__(self):
        self._refs: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get(self, model: str, devices: int, rank: int, dtype: str) -> list:
        """The shard set's reference, wrapped in a list so that Ray returns the reference, not the arrays."""
        import ray

        key = (model, devices, rank, dtype)
        with self._lock:
            if key not in self._refs:
                w = load_rank_weights(Checkpoint(model), rank, devices, dtype=DTYPES[dtype])
                self._refs[key] = ray.put(pack(w))
                del w
                _return_freed_memory()  # the loading copy is in the object store now; keep only that one
            return [self._refs[key]]

    def keys(self) -> list[tuple]:
        return list(self._refs)


def node_store():
    """This node's WeightStore, started on first use (detached: it outlives the replicas that come and go)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(WeightStore).options(
        name=f"weights-{node}", namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_concurrency=8, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote()


def shared_rank_weights(model: str, devices: int, rank: int, dtype: torch.dtype,
                        device: torch.device | str) -> RankWeights:
    """Rank ``rank``'s shards from this node's store (loaded there once), mapped without a copy on CPU."""
    import ray

    ref = ray.get(node_store().get.remote(model, devices, rank, dtype_name(dtype)))[0]
    return unpack(ray.get(ref), Checkpoint(model), devices, dtype, device)
