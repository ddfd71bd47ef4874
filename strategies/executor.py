"""Runs any layout: one forward pass of the packed chunks, layer by layer, in the states and modes a ``Layout``
names, with each collective the cost model's op list names issued at the line marked ``<-``.

Activations are in one of four states (``strategies/layout.py``): REP (every rank, every packed token, full width),
TOK (my token rows, ``TokenShards``), FEAT (every token, my p-th of the features), PSUM (every token, partial sums).
Features are in canonical order: the rank-major concatenation of the ranks' blocks (qkv's output is rank 0's heads'
q, k, v, then rank 1's, ...; gate_up's is rank 0's gate and up, ...), which is the order the resident shards already
split them in, so a FEAT activation produced by a column-parallel shard is the block a row-parallel shard consumes.
The hidden size, which no shard splits, is zero-padded to a multiple of p where it is split (exact).

Every rank writes the K/V of its own KV heads into the paged cache, whatever the layout: decode (Megatron) reads them
there, so the handoff from any prefill layout is free.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch
import torch.nn.functional as F

from strategies.comm import Comm
from strategies.kv_cache import PackedChunks, PagedKVCache, paged_attention
from strategies.layers import apply_rope, causal_attention, embed_partial, rms_norm, rope_tables
from strategies.layout import (ATTN_STATE, FEAT, FULL_WEIGHT, GIVES, NEEDS, PSUM, REP, SPLIT_BY_OUTPUT, TOK, Attn,
                               Layout, Mode, feature_width)
from strategies.layout_weights import Blocks
from strategies.packed import linear
from strategies.sharding import RankWeights
from strategies.token_sharded import TokenShards


class LayoutPass:
    """One forward pass of layout ``c`` on this rank: the state moves, the matmuls and the attention."""

    def __init__(self, c: Layout, w: RankWeights, comm: Comm, cache: PagedKVCache, batch: PackedChunks,
                 cos: torch.Tensor, sin: torch.Tensor, balanced: bool = True):
        self.c, self.w, self.comm, self.cache, self.batch = c, w, comm, cache, batch
        self.p, self.r = comm.world_size, comm.rank
        self.cos, self.sin = rope_tables(cos, sin)  # [T, 1, dh] each, built once for every layer
        self.balanced = balanced
        prefixes = [ctx[:sp.cached] for sp, ctx in zip(batch.spans, batch.contexts) if ctx is not None]
        self.prefix_slots = torch.cat(prefixes) if prefixes else None

    @cached_property
    def tok(self) -> TokenShards:
        """The pass's token split, built only by a layout that shards tokens (not on a megatron decode step)."""
        return TokenShards(self.batch.ids.shape[0], self.p, self.r, self.balanced, self.batch.ids.device)

    # -- the state transitions: the only collectives of a layer besides attention's K/V ------------------------------

    def _feat(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return F.pad(x, (0, feature_width(width, self.p) - width))

    def move(self, x: torch.Tensor, state: str, need: str, width: int) -> torch.Tensor:
        """``x`` (logical width ``width``) from ``state`` into ``need``."""
        if state == need:
            return x
        p, r, tok, comm = self.p, self.r, self.tok, self.comm
        if (state, need) == (REP, TOK):  # free: my rows
            return tok.local(x)
        if (state, need) == (REP, FEAT):  # free: my features
            xp = self._feat(x, width)
            n = xp.shape[1] // p
            return xp[:, r * n:(r + 1) * n]
        if (state, need) == (TOK, REP):
            return tok.packed(comm.all_gather(x).flatten(0, 1))  # <- all-gather of the token shards
        if (state, need) == (FEAT, REP):
            g = comm.all_gather(x)  # <- all-gather of the feature blocks [p, T, w/p]
            return g.permute(1, 0, 2).flatten(1)[:, :width]
        if (state, need) == (TOK, FEAT):
            xp = self._feat(x, width)
            blocks = xp.view(tok.tc, p, -1).transpose(0, 1)  # [p, Tc, w/p]: feature block j goes to rank j
            return tok.packed(comm.all_to_all(blocks).flatten(0, 1))  # <- all-to-all: my features, every token
        if (state, need) == (FEAT, TOK):
            blocks = tok.rank_major(x).view(p, tok.tc, -1)  # token shard j goes to rank j
            got = comm.all_to_all(blocks)  # <- all-to-all: my tokens, every feature block [p, Tc, w/p]
            return got.permute(1, 0, 2).flatten(1)[:, :width]
        if (state, need) == (PSUM, REP):
            return comm.all_reduce(x)  # <- all-reduce of the partial sums
        if (state, need) == (PSUM, TOK):
            return comm.reduce_scatter(tok.rank_major(x).view(p, tok.tc, -1))  # <- reduce-scatter by token
        if (state, need) == (PSUM, FEAT):
            xp = self._feat(x, width)
            return comm.reduce_scatter(xp.view(xp.shape[0], p, -1).transpose(0, 1))  # <- reduce-scatter by feature
        raise ValueError(f"no transition from {state} to {need}")

    # -- compute -----------------------------------------------------------------------------------------------------

    def matmul(self, name: str, mode: Mode, x: torch.Tensor, state: str, weight: torch.Tensor | Blocks,
               width: int) -> tuple[torch.Tensor, str]:
        """Y = X·Wᵀ in ``mode``; ``x`` (logical width ``width``) arrives in ``state`` and is moved first."""
        x = self.move(x, state, NEEDS[mode], width)
        if mode not in FULL_WEIGHT:  # a shard (or a transposed shard): its split matches the input's
            return linear(x, weight), GIVES[mode]
        if name in SPLIT_BY_OUTPUT:  # whole matrix as p blocks of output features: outputs in canonical order
            return torch.cat([linear(x, blk) for blk in weight], dim=-1), GIVES[mode]
        k = x.shape[1] // len(weight)  # blocks of input features: sum the blocks' products
        y = linear(x[:, :k], weight[0])
        for j in range(1, len(weight)):
            y = y.addmm(x[:, j * k:(j + 1) * k], weight[j].T)
        return y, GIVES[mode]

    def swiglu(self, x: torch.Tensor, state: str) -> torch.Tensor:
        """SwiGLU per rank block ([gate_r, up_r] → f_r), so the output stays in canonical order."""
        blocks = 1 if state == FEAT else self.p
        gate, up = x.view(x.shape[0], blocks, -1).chunk(2, dim=-1)
        return (F.silu(gate) * up).flatten(1)

    def attention(self, i: int, x: torch.Tensor, state: str, width: int) -> tuple[torch.Tensor, str]:
        mode = self.c.attn
        x = self.move(x, state, ATTN_STATE[mode], width)
        lay, dh = self.w.layout, self.w.shape.head_dim
        hq, hkv, scale = lay.q_per_rank, lay.kv_per_rank, dh ** -0.5
        if mode is Attn.HEADS:  # my heads, every token: the Megatron attention, over the paged cache
            heads = x.view(x.shape[0], hq + 2 * hkv, dh)
            qk = apply_rope(heads[:, :hq + hkv], self.cos, self.sin)  # q and k rotated at once
            q, k, v = qk[:, :hq], qk[:, hq:], heads[:, hq + hkv:]
            self.cache.write(i, self.batch.slots, k, v)
            out = paged_attention(q, k, v, self.cache, i, self.batch, scale)
            return out.flatten(1), ATTN_STATE[mode]
        rows = x.shape[0]
        q, k, v = x.view(rows, self.p, -1).split([hq * dh, hkv * dh, hkv * dh], dim=-1)  # every head, rank-major
        tokens = mode is Attn.TOKENS
        cos, sin = (self.tok.local(self.cos), self.tok.local(self.sin)) if tokens else (self.cos, self.sin)
        q = apply_rope(q.reshape(rows, -1, dh), cos, sin)
        k = apply_rope(k.reshape(rows, -1, dh), cos, sin)
        v = v.reshape(rows, -1, dh)
        if tokens:
            kv = self.comm.all_gather(torch.stack([k, v]))  # <- all-gather of K/V [p, 2, Tc, Hkv, dh]
            keys, values = (self.tok.packed(kv[:, j].flatten(0, 1)) for j in (0, 1))
            ranges = self.tok.ranges
        else:
            keys, values, ranges = k, v, [(0, rows, 0)]
        prefix_k = prefix_v = None
        if self.prefix_slots is not None:  # <- all-gather of the cached prefix's K/V [p, 2, C, Hkv/p, dh]: every head
            everyone = self.comm.all_gather(torch.stack(self.cache.read(i, self.prefix_slots)))
            prefix_k, prefix_v = (everyone[:, j].permute(1, 0, 2, 3).flatten(1, 2) for j in (0, 1))
        mine = slice(self.r * hkv, (self.r + 1) * hkv)
        self.cache.write(i, self.batch.slots, keys[:, mine], values[:, mine])  # my heads: the decode layout
        out = torch.zeros_like(q)
        c0 = 0  # where this chunk's prefix starts in the gathered prefixes
        for sp in self.batch.spans:
            for g0, g1, l0 in ranges:  # the packed rows I hold queries for
                a, b = max(sp.start, g0), min(sp.stop, g1)
                if a < b:  # they see the chunk's prefix and its keys up to b
                    kk, vv = keys[sp.start:b], values[sp.start:b]
                    if sp.cached:
                        kk = torch.cat([prefix_k[c0:c0 + sp.cached], kk])
                        vv = torch.cat([prefix_v[c0:c0 + sp.cached], vv])
                    mine_rows = slice(l0 + a - g0, l0 + b - g0)
                    out[mine_rows] = causal_attention(q[mine_rows], kk, vv, sp.cached + a - sp.start, scale)
            c0 += sp.cached
        return out.flatten(1), ATTN_STATE[mode]

    # -- the pass ----------------------------------------------------------------------------------------------------

    def run(self, layers: Iterable[dict[str, torch.Tensor | Blocks]]) -> torch.Tensor:
        """Hidden states after the final norm, in the residual state: [T, E] (REP) or my rows [Tc, E] (TOK)."""
        c, w, s = self.c, self.w, self.w.shape
        e, eps = s.hidden_size, s.rms_norm_eps
        lay, dh, p = w.layout, s.head_dim, self.p
        qkv_w = p * (lay.q_per_rank + 2 * lay.kv_per_rank) * dh
        attn_w, f = p * lay.q_per_rank * dh, p * lay.ffn_per_rank
        x = self.move(embed_partial(w.embed, self.batch.ids, w.rank), PSUM, c.residual, e)  # vocab-parallel embedding
        for i, (layer, mats) in enumerate(zip(w.layers, layers)):
            h = rms_norm(x, layer.attn_norm, eps)
            a, state = self.matmul("qkv", c.qkv, h, c.residual, mats["qkv"], e)
            a, state = self.attention(i, a, state, qkv_w)
            a, state = self.matmul("o", c.o, a, state, mats["o"], attn_w)
            x = x.add_(self.move(a, state, c.residual, e))  # the residual stream is this pass's own tensor
            h = rms_norm(x, layer.mlp_norm, eps)
            a, state = self.matmul("gate_up", c.gate_up, h, c.residual, mats["gate_up"], e)
            if state == PSUM:  # SwiGLU is nonlinear: partial sums are reduced first, into what down needs
                a, state = self.move(a, state, NEEDS[c.down], 2 * f), NEEDS[c.down]
            a = self.swiglu(a, state)
            a, state = self.matmul("down", c.down, a, state, mats["down"], f)
            x = x.add_(self.move(a, state, c.residual, e))
        return rms_norm(x, w.final_norm, eps)
