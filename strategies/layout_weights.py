"""Where each matrix's weights come from when a layout runs, from the one resident copy.

Every rank keeps its Megatron shards (``strategies/sharding.py``): qkv and gate_up split by output features, o and
down by input features; decode reads only these. A layout may ask for more, and each extra is exactly what the cost
model's ``resident_bytes`` charges:
- a *replicated* (or redundant) matrix is held whole: the other ranks' blocks are gathered once and kept, and the
  rank's own block stays its resident shard (the replica is built around it: (p−1)/p of the matrix extra, nothing
  held twice);
- a *gathered* matrix is rebuilt layer by layer: the layer's gathered shards go out in one all-gather (a view of the
  flat shard buffer when they sit together in it) into one of two reused buffers, layer i+1's gather overlapping
  layer i's compute;
- a *transposed* matrix (qkv or gate_up split by input features, o or down by output features) needs a second shard
  sliced the other way, sliced once from a one-time gather.
Replicas and second shards are built only within ``budget_bytes``; a layout that would not fit is refused with
``StrategyUnavailable`` (the others keep working) instead of risking an out-of-memory crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from strategies.comm import Comm
from strategies.layout import (HELD_WHOLE, MATRICES, SPLIT_BY_OUTPUT, Layout, Mode, adjacent, feature_width,
                               transposed)
from strategies.packed import PackedLinear, Weight, pack
from strategies.sharding import RankWeights

Blocks = Sequence[Weight]  # the whole matrix as its p rank blocks (a [p, rows, cols] tensor or a list)


class StrategyUnavailable(ValueError):
    """The layout cannot run here (e.g. its replicas do not fit the memory budget)."""


def extras(c: Layout, p: int) -> set[tuple[str, str]]:
    """What a layout needs beyond the shards: ("replica" | "transposed", matrix) pairs."""
    if p == 1:
        return set()
    need = {("replica", m) for m, mode in c.modes().items() if mode in HELD_WHOLE}
    return need | {("transposed", m) for m, mode in c.modes().items() if transposed(m, mode)}


class LayoutWeights:
    """One rank's source of every matrix in the mode a layout runs it: shard, replica blocks, gathered blocks or the
    transposed shard. ``prepare`` builds what layouts keep resident; ``layers`` yields each layer's weights."""

    def __init__(self, w: RankWeights, comm: Comm, budget_bytes: int):
        self.w, self.comm, self.budget_bytes = w, comm, budget_bytes
        self.p, self.rank = comm.world_size, comm.rank
        self.built: dict[tuple[str, str], list[torch.Tensor]] = {}  # extra -> per layer tensor
        self.buffers: list[torch.Tensor] = []  # two flat gather buffers of p·n, n the most a layout gathers
        self.send: torch.Tensor | None = None  # packed gathered shards when they are not adjacent in the flat buffer
        self.packed: dict[tuple[int, str], PackedLinear] = {}  # (layer, matrix) -> the shard prepacked for the GEMM

    def pack_shards(self) -> None:
        """Prepack every resident shard for the CPU's GEMM (``strategies/packed.py``): the passes that multiply by a
        shard as it is (every matrix at p = 1, Megatron's and the other layouts' sharded modes) use the packed copy."""
        self.packed = {(i, m): pack(self.shard(i, m)) for i in range(len(self.w.layers)) for m in MATRICES}

    # -- memory ------------------------------------------------------------------------------------------------------

    def extra_bytes(self, need: Iterable[tuple[str, str]]) -> int:
        """Bytes per rank of the extras in ``need`` (built or not)."""
        total = 0
        e, p = self.w.shape.hidden_size, self.p
        for kind, m in need:
            rows, cols = self.w.offsets[m][1]
            shard = rows * cols
            if kind == "replica":
                total += (p - 1) * shard
            else:  # the other dimension whole, a p-th of the padded hidden size
                whole = shard * p // e
                total += whole * feature_width(e, p) // p
        return total * self.w.layers[0].flat.element_size() * len(self.w.layers)

    def fits(self, layouts: Iterable[Layout]) -> bool:
        """Whether these layouts' extras, with those already built, fit the budget together."""
        need = set(self.built) | {x for c in layouts for x in extras(c, self.p)}
        return self.extra_bytes(need) <= self.budget_bytes

    def prepare(self, layouts: Iterable[Layout]) -> None:
        """Build the replicas and transposed shards ``layouts`` need (one all-gather per matrix and layer, once)."""
        layouts = list(layouts)
        missing = {x for c in layouts for x in extras(c, self.p)} - set(self.built)
        if not missing:
            return
        if not self.fits(layouts):
            want = self.extra_bytes(set(self.built) | missing)
            names = ", ".join(c.name for c in layouts)
            raise StrategyUnavailable(f"{names} need {want / 2**20:.0f} MiB of replicas per device, over the "
                                      f"budget of {self.budget_bytes / 2**20:.0f} MiB")
        for kind, m in sorted(missing):
            per_layer = []
            for i in range(len(self.w.layers)):
                full = self.comm.all_gather(self.shard(i, m))  # <- all-gather of the shards, once, at build time
                if kind == "replica":
                    others = [j for j in range(self.p) if j != self.rank]
                    per_layer.append(full[others].clone())
                else:
                    per_layer.append(self._slice_transposed(m, full))
            self.built[(kind, m)] = per_layer

    def _slice_transposed(self, m: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's p-th of the (zero-padded) hidden dimension of the whole matrix in canonical (rank-major) order:
        qkv/gate_up [N, E/p] (columns), o/down [E/p, K] (rows)."""
        e, p, r = self.w.shape.hidden_size, self.p, self.rank
        ep = feature_width(e, p)
        if m in SPLIT_BY_OUTPUT:  # full [p, n_r, E] -> [N, E_pad] -> columns of rank r
            whole = torch.nn.functional.pad(full.flatten(0, 1), (0, ep - e))
            return whole[:, r * ep // p:(r + 1) * ep // p].clone()
        whole = torch.nn.functional.pad(full.permute(1, 0, 2).flatten(1), (0, 0, 0, ep - e))  # [E_pad, K]
        return whole[r * ep // p:(r + 1) * ep // p].clone()

    def nbytes(self) -> dict[str, int]:
        size = self.w.layers[0].flat.element_size()
        replicas = sum(t.numel() for (k, _), ts in self.built.items() if k == "replica" for t in ts) * size
        other = sum(t.numel() for (k, _), ts in self.built.items() if k == "transposed" for t in ts) * size
        buffers = sum(b.numel() * b.element_size() for b in self.buffers)
        send = self.send.numel() * self.send.element_size() if self.send is not None else 0
        return {"replicas": replicas, "transposed": other, "gather_buffer": buffers + send,
                "packed": sum(x.nbytes for x in self.packed.values())}

    # -- what a forward pass reads -----------------------------------------------------------------------------------

    def shard(self, i: int, m: str) -> torch.Tensor:
        return self.w.block(self.w.layers[i].flat, m)

    def _computed(self, i: int, m: str) -> Weight:
        """The shard as a matmul multiplies by it: its packed copy where there is one."""
        return self.packed.get((i, m)) or self.shard(i, m)

    def layers(self, c: Layout) -> Iterator[dict[str, torch.Tensor | Blocks]]:
        """Per layer, each matrix as its mode computes with it: the shard, the transposed shard, or the whole matrix
        as p blocks (replica blocks around the shard, or this layer's gathered buffer)."""
        self.prepare([c])
        gathered = [m for m in MATRICES if c.modes()[m] is Mode.GATHERED and self.p > 1]
        pending = self._gather(0, gathered) if gathered else None
        for i in range(len(self.w.layers)):
            mats: dict[str, torch.Tensor | Blocks] = {}
            if pending is not None:
                full = pending.wait()
                if i + 1 < len(self.w.layers):  # <- all-gather of layer i+1's weights, overlapping layer i's compute
                    pending = self._gather(i + 1, gathered)
                at = 0
                for m in gathered:
                    rows, cols = self.w.offsets[m][1]
                    mats[m] = full[:, at:at + rows * cols].unflatten(1, (rows, cols))
                    at += rows * cols
            for m, mode in c.modes().items():
                if m in mats:
                    continue
                if self.p == 1:
                    mats[m] = [self._computed(i, m)] if mode not in (Mode.COL, Mode.ROW) else self._computed(i, m)
                elif mode in HELD_WHOLE:
                    others = list(self.built[("replica", m)][i])
                    mats[m] = others[:self.rank] + [self.shard(i, m)] + others[self.rank:]
                elif transposed(m, mode):
                    mats[m] = self.built[("transposed", m)][i]
                else:
                    mats[m] = self._computed(i, m)
            yield mats

    def _gather(self, i: int, gathered: list[str]):
        """Start the all-gather of layer i's gathered shards into the buffer of its parity."""
        flat = self.w.layers[i].flat
        spans = [self.w.offsets[m] for m in gathered]
        n = sum(r * c for _, (r, c) in spans)
        if not self.buffers or self.buffers[0].numel() < self.p * n:
            self.buffers = [torch.empty(self.p * n, dtype=flat.dtype, device=flat.device) for _ in range(2)]
        if adjacent(gathered):
            send = flat[spans[0][0]:spans[0][0] + n]
        else:  # pack the shards into one send buffer: still one collective per layer
            if self.send is None or self.send.numel() < n:
                self.send = torch.empty(n, dtype=flat.dtype, device=flat.device)
            send, at = self.send[:n], 0
            for start, (r, c) in spans:
                send[at:at + r * c].copy_(flat[start:start + r * c])
                at += r * c
        out = self.buffers[i % 2][:self.p * n].view(self.p, n)
        return self.comm.all_gather_async(send, out=out)  # <- all-gather of the layer's gathered weights
