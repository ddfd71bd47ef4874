"""The decode-layout KV cache of one rank, in fixed-size blocks: keys and values of this rank's KV heads only.

Storage per layer is ``[num_blocks * block_size, Hkv_local, dh]``: token slot ``block * block_size + offset``. Which
blocks a sequence owns (its block table) is the engine's business (``app/engine/blocks.py``); a forward pass is told
each sequence's table and writes/reads through it. Every prefill strategy writes its K/V here sharded by KV head,
which is what makes the handoff to Megatron decode free, and blocks are what the disaggregated handoff moves.

How many blocks fit is a memory budget divided by the bytes of one block (``block_bytes``), not slots × max length:
short sequences hold few blocks, so a replica holds as many sequences as its memory allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from strategies.layers import SequenceSpan, causal_attention


@dataclass
class Chunk:
    """The new tokens of one sequence in one forward pass: ``ids`` at positions ``cached`` .. ``cached+len-1``, the
    first ``cached`` tokens' K/V already in the cache; ``blocks`` is the sequence's block table (covering them all).
    ``all_logits``: the pass returns the logits of every token of the chunk, not only its last (a prompt scored)."""

    ids: list[int]
    cached: int
    blocks: list[int] = field(default_factory=list)
    all_logits: bool = False

    @property
    def context(self) -> int:
        return self.cached + len(self.ids)


def block_bytes(num_layers: int, kv_heads: int, head_dim: int, block_size: int, itemsize: int) -> int:
    """Bytes one block takes on one rank: K and V of every layer for ``block_size`` tokens of ``kv_heads`` heads."""
    return 2 * num_layers * kv_heads * head_dim * block_size * itemsize


def table_slots(blocks: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of ``positions`` of a sequence with block table ``blocks``."""
    table = torch.tensor(blocks, dtype=torch.long)
    if positions.numel() and int(positions.max()) >= table.numel() * block_size:
        raise ValueError(f"block table of {table.numel()} blocks cannot hold position {int(positions.max())}")
    return table[positions // block_size] * block_size + positions % block_size


@dataclass
class PackedChunks:
    """One forward pass's chunks packed into one token array, with everything attention needs, built once per pass.

    One-token chunks (decode) are attended as one batch over their block tables: whole blocks are gathered (one
    contiguous copy of ``block_size`` tokens each, not one per token), each row padded to the longest table by
    repeating its own first block, and every position at or past a row's context is masked. Longer chunks (prefill)
    are attended one by one: over their own new K/V when nothing is cached, else over their context read from the
    cache by block.
    """

    spans: list[SequenceSpan]
    ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T]: where each new token's K/V goes
    decode_rows: torch.Tensor  # [B]: token rows of the one-token chunks
    decode_blocks: torch.Tensor  # [B, Nmax]: their block tables, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, Nmax * block_size] additive (0 or -inf, the pass's dtype), None
    #                                   when no position is padding
    contexts: list[torch.Tensor | None]  # per chunk: its context's slots (prefix + new), None when nothing is cached
    context_blocks: list[torch.Tensor | None]  # per chunk: the blocks holding that context, None likewise
    all_decode: bool = False  # every chunk is one token: the decode rows are every row, in order

    @property
    def prefill(self) -> list[tuple[SequenceSpan, torch.Tensor | None]]:
        """The chunks of more than one token, with the blocks of their cached context (None: nothing cached)."""
        return [(sp, blk) for sp, blk in zip(self.spans, self.context_blocks) if sp.length > 1]

    @classmethod
    def build(cls, chunks: list[Chunk], block_size: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> "PackedChunks":
        """Built from Python lists, one tensor per field (a decode step of B sequences is B one-token chunks: per-chunk
        tensors would cost B small ops each)."""
        spans, start = [], 0
        for c in chunks:
            if not c.ids:
                raise ValueError("a chunk needs at least one token")
            if c.context > len(c.blocks) * block_size:
                raise ValueError(f"block table of {len(c.blocks)} blocks cannot hold position {c.context - 1}")
            spans.append(SequenceSpan(start=start, length=len(c.ids), cached=c.cached))
            start += len(c.ids)
        positions = [p for c in chunks for p in range(c.cached, c.context)]
        slots = [c.blocks[p // block_size] * block_size + p % block_size
                 for c in chunks for p in range(c.cached, c.context)]
        used = [-(-c.context // block_size) for c in chunks]  # blocks holding each chunk's context
        decode = [b for b, c in enumerate(chunks) if len(c.ids) == 1]
        nmax = max((used[b] for b in decode), default=0)
        # a decode row's table padded to the longest by repeating its own first block (masked)
        dblocks = [chunks[b].blocks[:used[b]] + [chunks[b].blocks[0]] * (nmax - used[b]) for b in decode]
        lens = [chunks[b].context for b in decode]
        mask = None
        if decode and min(lens) < nmax * block_size:
            past = torch.arange(nmax * block_size)[None, :] >= torch.tensor(lens)[:, None]
            mask = torch.zeros(past.shape, dtype=dtype).masked_fill_(past, float("-inf"))[:, None, None, :].to(device)

        def long(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(spans=spans, ids=long([t for c in chunks for t in c.ids]), positions=long(positions),
                   slots=long(slots), decode_rows=long([spans[b].start for b in decode]),
                   decode_blocks=long(dblocks).view(len(decode), nmax), decode_mask=mask,
                   contexts=[table_slots(c.blocks, torch.arange(c.context), block_size).to(device) if c.cached
                             else None for c in chunks],
                   context_blocks=[long(c.blocks[:n]) if c.cached else None for c, n in zip(chunks, used)],
                   all_decode=len(decode) == len(chunks))

    @property
    def last_rows(self) -> list[int]:
        return [sp.stop - 1 for sp in self.spans]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: "PagedKVCache", layer: int,
                    batch: PackedChunks, scale: float) -> torch.Tensor:
    """Causal attention of the packed queries [T, Hq, dh] over each sequence's context; the new K/V [T, Hkv, dh]
    must already be in ``cache`` (written by the caller)."""
    out = None if batch.all_decode else torch.empty_like(q)
    if batch.decode_rows.numel():
        keys, values = cache.read_blocks(layer, batch.decode_blocks)  # [B, Nmax * block_size, Hkv, dh]
        rows = q if batch.all_decode else q[batch.decode_rows]
        o = F.scaled_dot_product_attention(rows.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=batch.decode_mask, scale=scale, enable_gqa=True)  # [B, Hq, 1, dh]
        if batch.all_decode:  # a decode step: nothing else to place
            return o[:, :, 0]
        out[batch.decode_rows] = o[:, :, 0]
    for sp, blocks in batch.prefill:
        if blocks is None:
            keys, values = k[sp.start:sp.stop], v[sp.start:sp.stop]
        else:
            keys, values = (t[0, :sp.cached + sp.length] for t in cache.read_blocks(layer, blocks[None]))
        out[sp.start:sp.stop] = causal_attention(q[sp.start:sp.stop], keys, values, sp.cached, scale)
    return out


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)
        # Zeroed, not ``empty``: a decode row reads whole blocks, so the unwritten tail of a sequence's last block is
        # read (and masked); masked garbage could be NaN, and 0 x NaN would leak into the output. Stale K/V of a
        # freed block's former sequence is finite, so reuse needs no clearing.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [T, Hkv_local, dh] of new tokens at cache ``slots`` [T]."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at ``slots`` (any shape S) as [*S, Hkv_local, dh] copies."""
        flat = slots.reshape(-1)
        k = self.k[layer].index_select(0, flat).view(*slots.shape, *self.k[layer].shape[1:])
        v = self.v[layer].index_select(0, flat).view(*slots.shape, *self.v[layer].shape[1:])
        return k, v

    def read_blocks(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of whole ``blocks`` [B, N] as [B, N * block_size, Hkv_local, dh] copies: one contiguous copy per block,
        where ``read`` copies per token."""
        b, n = blocks.shape
        out = []
        for t in (self.k[layer], self.v[layer]):
            by_block = t.view(self.num_blocks, self.block_size, *t.shape[1:])
            out.append(by_block.index_select(0, blocks.reshape(-1)).view(b, n * self.block_size, *t.shape[1:]))
        return out[0], out[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
