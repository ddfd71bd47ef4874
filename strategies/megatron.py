"""``megatron``: 1D weight-stationary tensor parallelism (Shoeybi et al.), used for decode and for short prefills.

Every rank sees all tokens (replicated activations). Per layer:
  QKV column-parallel (this rank's heads) -> attention by head -> O row-parallel -> ALL-REDUCE
  -> gate/up column-parallel -> SwiGLU -> down row-parallel -> ALL-REDUCE
Two all-reduces of T x E per layer: communication grows with the number of tokens. K/V are produced by head, so they
go straight into the head-sharded cache: decode needs no handoff.
"""

from __future__ import annotations

import torch

from strategies.comm import Comm
from strategies.kv_cache import PackedChunks, PagedKVCache, paged_attention
from strategies.layers import apply_rope, embed_partial, rms_norm, swiglu
from strategies.sharding import RankWeights


def megatron_forward(w: RankWeights, comm: Comm, cache: PagedKVCache, batch: PackedChunks, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """Run all layers on the packed chunks; return hidden states [T, E] (replicated on every rank). Prefill chunks
    (many tokens, maybe after a cached prefix) and decode (one token each) are the same code, in one pass."""
    s, lay = w.shape, w.layout
    hq, hkv, dh = lay.q_per_rank, lay.kv_per_rank, s.head_dim
    scale = dh ** -0.5
    x = comm.all_reduce(embed_partial(w.embed, batch.ids, w.rank))  # <- all-reduce: vocab-parallel embedding
    for i, layer in enumerate(w.layers):
        h = rms_norm(x, layer.attn_norm, s.rms_norm_eps)
        qkv = h @ w.block(layer.flat, "qkv").T  # column-parallel: this rank's heads only
        q, k, v = qkv.split([hq * dh, hkv * dh, hkv * dh], dim=-1)
        q = apply_rope(q.view(-1, hq, dh), cos, sin)
        k = apply_rope(k.view(-1, hkv, dh), cos, sin)
        v = v.view(-1, hkv, dh)
        cache.write(i, batch.slots, k, v)  # this rank's heads: the decode layout
        attn = paged_attention(q, k, v, cache, i, batch, scale)
        o = attn.flatten(1) @ w.block(layer.flat, "o").T  # row-parallel: partial sums
        x = x + comm.all_reduce(o)  # <- all-reduce 1 of 2
        h = rms_norm(x, layer.mlp_norm, s.rms_norm_eps)
        a = swiglu(h @ w.block(layer.flat, "gate_up").T)  # column-parallel
        x = x + comm.all_reduce(a @ w.block(layer.flat, "down").T)  # <- all-reduce 2 of 2 (row-parallel down)
    return rms_norm(x, w.final_norm, s.rms_norm_eps)
