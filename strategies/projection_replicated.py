"""``projection_replicated``: every projection (Q, K, V, O, gate, up, down) replicated on every rank, tokens sharded.

What is replicated and why: the full weights of every transformer layer, assembled once from the ranks' Megatron
shards (one all-gather per layer at materialisation, never again). With them each rank runs its T/p tokens through
every projection with no weight traffic at all, so a layer needs exactly one collective — the K/V ALL-GATHER that
causal attention over token shards requires — and p−1 latency steps, against Megatron's two all-reduces (4(p−1)
steps, bytes ∝ T·E) and weight-gathering's per-layer weight all-gather. The price is memory: (p−1)·P_L·b/p extra per
layer per rank, not more: the rank's own shard becomes a view of its row of the replica (decode keeps reading it
there), so nothing is held twice. Embedding and LM head stay vocab-parallel (not replicated): they are used once per
forward.

Replicas are built only when they fit ``budget_bytes``; otherwise the strategy reports itself unavailable with
``StrategyUnavailable`` instead of risking an out-of-memory crash. The resident shards are untouched, so decode
(Megatron) and the other strategies keep working, and ``release`` frees the replicas.
"""

from __future__ import annotations

import torch

from strategies.comm import Comm
from strategies.sharding import RankWeights


class StrategyUnavailable(ValueError):
    """The strategy cannot run here (e.g. its replicas do not fit the memory budget)."""


def replica_bytes(w: RankWeights, devices: int) -> int:
    """Extra memory per rank for the replicas: the other ranks' layer blocks ([p, n] per layer, whose row ``rank``
    replaces the rank's own shard)."""
    flat = w.layers[0].flat
    return len(w.layers) * (devices - 1) * flat.numel() * flat.element_size()


class ReplicatedLayers:
    """Resident full layer weights ([p, n] per layer), materialised on first use if they fit."""

    def __init__(self, w: RankWeights, comm: Comm, budget_bytes: int):
        self.w, self.comm, self.budget_bytes = w, comm, budget_bytes
        self.replicas: list[torch.Tensor] | None = None

    @property
    def needed_bytes(self) -> int:
        return replica_bytes(self.w, self.comm.world_size)

    def fits(self) -> bool:
        return self.replicas is not None or self.needed_bytes <= self.budget_bytes

    def materialise(self) -> list[torch.Tensor]:
        if self.replicas is None:
            if not self.fits():
                raise StrategyUnavailable(
                    f"projection_replicated needs {self.needed_bytes / 2**20:.0f} MiB of replicas per device, "
                    f"over the budget of {self.budget_bytes / 2**20:.0f} MiB")
            replicas = []
            for layer in self.w.layers:
                full = self.comm.all_gather(layer.flat)  # <- all-gather of the layer's shards, once, at build time
                layer.flat = full[self.comm.rank]  # the shard is now a view of its row: held once
                replicas.append(full)
            self.replicas = replicas
        return self.replicas

    def release(self) -> None:
        """Free the replicas: each shard gets its own copy again first."""
        if self.replicas is not None:
            for layer in self.w.layers:
                layer.flat = layer.flat.clone()
        self.replicas = None

    def nbytes(self) -> int:
        return 0 if self.replicas is None else self.needed_bytes
