"""The token-sharded layer that ``weight_gathered`` and ``projection_replicated`` share.

The packed prompt tokens (padded) are cut into 2p equal chunks and rank r takes chunks r and 2p−1−r (the zigzag of
ring and striped attention): under a causal mask a later token attends to more keys, so contiguous shards would give
the last rank (2p−1)/p² of the attention work; the zigzag gives every rank 1/p. Each rank computes every matrix of
the layer for its own tokens, with the full (padded) weights given as the ranks' blocks stacked ``[p, n]``.
The two strategies differ only in where those full weights come from: gathered layer by layer from the resident
shards (``weight_gathered``), or kept resident as replicas (``projection_replicated``).

Per layer the only collective is the K/V all-gather that causal attention needs; after it every rank holds every
head's K/V and keeps its own heads' slice in the decode cache, so the handoff to Megatron decode is free.
Embedding: a reduce-scatter of the vocab-parallel partial lookups lands each rank's tokens on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from strategies.comm import Comm
from strategies.kv_cache import PackedChunks, PagedKVCache
from strategies.layers import apply_rope, causal_attention, embed_partial, rms_norm, swiglu
from strategies.sharding import RankWeights


def token_chunk(total: int, devices: int) -> int:
    """Tokens per rank: two zigzag chunks of the packed tokens padded up to a multiple of 2p."""
    return 2 * max(1, -(-total // (2 * devices)))


def rank_chunks(total: int, devices: int, rank: int, balanced: bool = True) -> list[tuple[int, int]]:
    """The packed (padded) token ranges [start, stop) a rank holds, in its row order: chunks r and 2p−1−r of 2p
    (``balanced``, the zigzag), or the r-th of p contiguous shards (the engine before it: the benchmark's baseline)."""
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


def _by_rank(x: torch.Tensor, heads: int, dh: int) -> torch.Tensor:
    """[p, T, heads*dh] (one block per rank) -> [T, p*heads, dh] in global (rank-major) head order."""
    p, t = x.shape[0], x.shape[1]
    return x.view(p, t, heads, dh).permute(1, 0, 2, 3).reshape(t, p * heads, dh)


def token_sharded_forward(w: RankWeights, comm: Comm, cache: PagedKVCache, batch: PackedChunks, cos: torch.Tensor,
                          sin: torch.Tensor, layer_weights: Iterable[torch.Tensor],
                          balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the packed chunks; ``layer_weights`` yields each layer's full weights as [p, n].

    A chunk after a cached prefix attends to the prefix too: the cache holds it sharded by KV head, so each layer
    all-gathers the prefix K/V (every rank's heads) before attention (the cost model prices that gather).
    Returns this rank's final hidden states [Tc, E] and the packed index of each of its rows [Tc] (padding rows
    have indices past the last token).
    """
    s, lay, p, r = w.shape, w.layout, comm.world_size, comm.rank
    hq, hkv, dh, e = lay.q_per_rank, lay.kv_per_rank, s.head_dim, s.hidden_size
    scale = dh ** -0.5
    total = batch.ids.shape[0]
    tc = token_chunk(total, p)
    order = shard_order(total, p, balanced).to(batch.ids.device)
    mine = order[r * tc:(r + 1) * tc]
    ranges, l0 = [], 0  # (first packed index, past the last, first local row) of each chunk I hold
    for g0, g1 in rank_chunks(total, p, r, balanced):
        ranges.append((g0, g1, l0))
        l0 += g1 - g0
    ids = torch.nn.functional.pad(batch.ids, (0, p * tc - total))[order]
    x = comm.reduce_scatter(embed_partial(w.embed, ids, r).view(p, tc, e))  # <- reduce-scatter: my tokens' embedding
    # padding tokens: any rotation will do, nothing attends to them
    cos_l = torch.nn.functional.pad(cos, (0, 0, 0, p * tc - total))[mine]
    sin_l = torch.nn.functional.pad(sin, (0, 0, 0, p * tc - total))[mine]
    prefixes = [ctx[:sp.cached] for sp, ctx in zip(batch.spans, batch.contexts) if ctx is not None]
    prefix_slots = torch.cat(prefixes) if prefixes else None
    my_heads = slice(r * hkv, (r + 1) * hkv)
    for i, (layer, full) in enumerate(zip(w.layers, layer_weights)):
        h = rms_norm(x, layer.attn_norm, s.rms_norm_eps)
        qkv = torch.matmul(h, w.block(full, "qkv").transpose(1, 2))  # [p, Tc, ...]: every head, my tokens
        q, k, v = qkv.split([hq * dh, hkv * dh, hkv * dh], dim=-1)
        q = apply_rope(_by_rank(q, hq, dh), cos_l, sin_l)
        k = apply_rope(_by_rank(k, hkv, dh), cos_l, sin_l)
        kv = comm.all_gather(torch.stack([k, _by_rank(v, hkv, dh)]))  # <- all-gather K/V [p, 2, Tc, Hkv, dh]
        keys = in_packed_order(kv[:, 0].flatten(0, 1), order, total)
        values = in_packed_order(kv[:, 1].flatten(0, 1), order, total)
        prefix_k = prefix_v = None
        if prefix_slots is not None:  # <- all-gather of the cached prefix's K/V [p, 2, C, Hkv/p, dh]: every head
            my_prefix = torch.stack(cache.read(i, prefix_slots))
            everyone = comm.all_gather(my_prefix)
            prefix_k, prefix_v = (everyone[:, j].permute(1, 0, 2, 3).flatten(1, 2) for j in (0, 1))
        cache.write(i, batch.slots, keys[:, my_heads], values[:, my_heads])  # my heads: the handoff to decode
        attn = torch.zeros_like(q)
        c0 = 0  # where this chunk's prefix starts in the gathered prefixes
        for sp in batch.spans:
            for g0, g1, l0 in ranges:  # my chunks (two, zigzag)
                a, b = max(sp.start, g0), min(sp.stop, g1)
                if a < b:  # this rank holds some of the chunk's queries: they see its prefix and its keys up to b
                    kk, vv = keys[sp.start:b], values[sp.start:b]
                    if sp.cached:
                        kk = torch.cat([prefix_k[c0:c0 + sp.cached], kk])
                        vv = torch.cat([prefix_v[c0:c0 + sp.cached], vv])
                    rows = slice(l0 + a - g0, l0 + b - g0)
                    attn[rows] = causal_attention(q[rows], kk, vv, sp.cached + a - sp.start, scale)
            c0 += sp.cached
        o_in = attn.view(tc, p, hq * dh).transpose(0, 1)  # [p, Tc, hq*dh]: each rank block's heads
        x = x + torch.bmm(o_in, w.block(full, "o").transpose(1, 2)).sum(0)
        h = rms_norm(x, layer.mlp_norm, s.rms_norm_eps)
        act = swiglu(torch.matmul(h, w.block(full, "gate_up").transpose(1, 2)))  # [p, Tc, F/p]
        x = x + torch.bmm(act, w.block(full, "down").transpose(1, 2)).sum(0)
    return rms_norm(x, w.final_norm, s.rms_norm_eps), mine
