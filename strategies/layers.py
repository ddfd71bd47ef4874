"""The Llama math every strategy shares: RMSNorm, rotary embedding, causal attention over packed sequences, SwiGLU,
and the vocab-parallel embedding and LM head.

Nothing here communicates except the two vocab-parallel functions, whose collectives are named at the line.
Numerics follow ``transformers``' Llama exactly (float32 norm, rotate-half rotary, SDPA) so float32 logits match it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from strategies.comm import Comm
from strategies.packed import Weight, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' LlamaRMSNorm: normalized in float32, cast back, then scaled (in float32 with no casts, and
    in place on the one new tensor: a decode step runs this 61 times on a few rows, where each op is overhead)."""
    if x.dtype == torch.float32:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))).mul_(weight)
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass's rotary tables [T, dh] as ``apply_rope`` takes them, [T, 1, dh]: cos, and sin with its first half
    negated, so that rotate-half (``cat(-x2, x1)``) becomes a roll (``cat(x2, x1)``) with the sign in the table;
    ``x2 * -s`` is ``-x2 * s`` exactly, so the result is bit for bit ``transformers``'."""
    half = sin.shape[-1] // 2
    return cos[:, None, :], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, dh] (any heads: q and k of a pass go through at once); cos/sin: ``rope_tables``."""
    return (x * cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin))  # not addcmul: its fused multiply-add rounds once


class Rotary:
    """Rotary tables from ``transformers``' own ``LlamaRotaryEmbedding``, so every rope scaling type that Llama
    checkpoints ship (default, linear, dynamic, llama3, yarn, longrope) matches the reference by construction."""

    def __init__(self, hf_config, device: torch.device | str = "cpu"):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.module = LlamaRotaryEmbedding(hf_config).to(device)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = torch.empty(0, dtype=dtype, device=positions.device)
        cos, sin = self.module(dummy, positions[None, :])
        return cos[0], sin[0]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float) -> torch.Tensor:
    """Attention of queries [Lq, Hq, dh] over keys/values [Lk, Hkv, dh] of one sequence.

    Query i sits at key position ``q_offset + i`` and sees keys 0..q_offset+i (causal). GQA: Hq is a multiple of Hkv.
    """
    lq, lk = q.shape[0], k.shape[0]
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if q_offset == 0 and lq == lk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    elif q_offset + lq == lk and lq == 1:  # decode: the one query sees every key
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True)
    else:
        qpos = torch.arange(q_offset, q_offset + lq, device=q.device)
        mask = torch.arange(lk, device=q.device)[None, :] <= qpos[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2F] (gate rows then up rows) -> [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def embed_partial(embed_shard: torch.Tensor, ids: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's part of a vocab-parallel embedding lookup: rows of ids outside its vocab slice are zero.
    Summing the parts over ranks (all-reduce or reduce-scatter) gives the embedding."""
    rows = embed_shard.shape[0]
    local = ids - rank * rows
    mine = (local >= 0) & (local < rows)
    out = F.embedding(local.clamp(0, rows - 1), embed_shard)
    return out * mine[:, None].to(out.dtype)


def lm_head_logits(comm: Comm, lm_head_shard: Weight, h: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel LM head: each rank scores its vocab slice, then the slices are gathered. h: [B, E] replicated."""
    local = linear(h, lm_head_shard)  # [B, V/p]
    gathered = comm.all_gather(local)  # <- all-gather of logits [p, B, V/p]
    return gathered.permute(1, 0, 2).reshape(h.shape[0], -1)[:, :vocab_size]


@dataclass
class SequenceSpan:
    """Where one sequence's new tokens sit in the packed token array, and its position offset (tokens cached before)."""

    start: int
    length: int
    cached: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.length
