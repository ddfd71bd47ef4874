"""Token shards: which packed token rows each rank holds when activations are split by token (the TOK state).

The packed tokens (padded) are cut into 2p equal chunks and rank r takes chunks r and 2p−1−r (the zigzag of ring and
striped attention): under a causal mask a later token attends to more keys, so contiguous shards would give the last
rank (2p−1)/p² of the attention work; the zigzag gives every rank 1/p. ``balanced=False`` keeps contiguous shards
(the engine before the zigzag: the benchmark's baseline). The cost model pads token counts the same way
(``strategies.layout.token_chunk``), so the bytes it prices are the bytes that move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strategies.layout import token_chunk


def rank_chunks(total: int, devices: int, rank: int, balanced: bool = True) -> list[tuple[int, int]]:
    """The packed (padded) token ranges [start, stop) a rank holds, in its row order: chunks r and 2p−1−r of 2p
    (``balanced``, the zigzag), or the r-th of p contiguous shards."""
    tc = token_chunk(total, devices)
    if not balanced:
        return [(rank * tc, (rank + 1) * tc)]
    c = tc // 2
    return [(rank * c, (rank + 1) * c), ((2 * devices - 1 - rank) * c, (2 * devices - rank) * c)]


def shard_order(total: int, devices: int, balanced: bool = True) -> torch.Tensor:
    """Packed (padded) token index of every rank's rows, rank-major [p·Tc]."""
    return torch.cat([torch.arange(a, b) for r in range(devices) for a, b in rank_chunks(total, devices, r, balanced)])


def in_packed_order(gathered: torch.Tensor, order: torch.Tensor, total: int) -> torch.Tensor:
    """Rows gathered rank-major ([p·Tc, ...] in ``order``) back in packed order, padding dropped ([total, ...])."""
    out = torch.empty_like(gathered)
    out[order.to(gathered.device)] = gathered
    return out[:total]


class TokenShards:
    """The token split of one forward pass of ``total`` packed tokens, seen from rank ``rank``."""

    def __init__(self, total: int, devices: int, rank: int, balanced: bool, device: torch.device):
        self.total, self.p, self.rank = total, devices, rank
        self.tc = token_chunk(total, devices)
        self.order = shard_order(total, devices, balanced).to(device)
        self.mine = self.order[rank * self.tc:(rank + 1) * self.tc]  # packed index of each of my rows
        # (first packed index, past the last, first local row) of each chunk I hold
        self.ranges, l0 = [], 0
        for g0, g1 in rank_chunks(total, devices, rank, balanced):
            self.ranges.append((g0, g1, l0))
            l0 += g1 - g0

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0) * (x.dim() - 1) + (0, self.p * self.tc - self.total))

    def rank_major(self, x: torch.Tensor) -> torch.Tensor:
        """Packed rows [total, ...] → every rank's rows, rank-major, padding rows zero [p·Tc, ...]."""
        return self._padded(x)[self.order]

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """Packed rows [total, ...] → my rows [Tc, ...]."""
        return self._padded(x)[self.mine]

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """Rank-major rows [p·Tc, ...] → packed order [total, ...]."""
        return in_packed_order(x, self.order, self.total)
