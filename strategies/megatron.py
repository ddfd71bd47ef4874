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
from strategies.kv_cache import KVCache
from strategies.layers import SequenceSpan, apply_rope, causal_attention, embed_partial, rms_norm, swiglu
from strategies.sharding import RankWeights


def megatron_forward(w: RankWeights, comm: Comm, cache: KVCache, ids: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, spans: list[SequenceSpan]) -> torch.Tensor:
    """Run all layers on packed tokens ``ids`` [T] of the sequences in ``spans``; return hidden states [T, E]
    (replicated on every rank). Prefill (many tokens per span) and decode (one per span) are the same code."""
    s, lay = w.shape, w.layout
    hq, hkv, dh = lay.q_per_rank, lay.kv_per_rank, s.head_dim
    scale = dh ** -0.5
    x = comm.all_reduce(embed_partial(w.embed, ids, w.rank))  # <- all-reduce: vocab-parallel embedding
    for i, layer in enumerate(w.layers):
        h = rms_norm(x, layer.attn_norm, s.rms_norm_eps)
        qkv = h @ w.block(layer.flat, "qkv").T  # column-parallel: this rank's heads only
        q, k, v = qkv.split([hq * dh, hkv * dh, hkv * dh], dim=-1)
        q = apply_rope(q.view(-1, hq, dh), cos, sin)
        k = apply_rope(k.view(-1, hkv, dh), cos, sin)
        v = v.view(-1, hkv, dh)
        attn = torch.empty_like(q)
        for sp in spans:
            cache.write(i, sp.slot, k[sp.start:sp.stop], v[sp.start:sp.stop])
            keys, values = cache.read(i, sp.slot, sp.length)
            attn[sp.start:sp.stop] = causal_attention(q[sp.start:sp.stop], keys, values, sp.cached, scale)
        o = attn.flatten(1) @ w.block(layer.flat, "o").T  # row-parallel: partial sums
        x = x + comm.all_reduce(o)  # <- all-reduce 1 of 2
        h = rms_norm(x, layer.mlp_norm, s.rms_norm_eps)
        a = swiglu(h @ w.block(layer.flat, "gate_up").T)  # column-parallel
        x = x + comm.all_reduce(a @ w.block(layer.flat, "down").T)  # <- all-reduce 2 of 2 (row-parallel down)
    return rms_norm(x, w.final_norm, s.rms_norm_eps)
