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


class Rotary(torch.nn.Module):
    """Rotary tables as ``transformers``' ``LlamaRotaryEmbedding`` makes them, from its own parts: the inverse
    frequencies of every rope type Llama checkpoints ship (default, linear, dynamic, llama3, yarn, longrope) by its
    ``ROPE_INIT_FUNCTIONS``, their update with the sequence length (dynamic, longrope) by its ``dynamic_rope_update``;
    only the five-line forward is written here, as ``LlamaRotaryEmbedding.forward`` is (``test_single_device`` checks
    each type against the reference model). Not the class itself: importing ``modeling_llama`` costs each shard worker
    process seconds at start."""

    def __init__(self, hf_config, device: torch.device | str = "cpu"):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

        super().__init__()
        self.config = hf_config
        self.max_seq_len_cached = self.original_max_seq_len = hf_config.max_position_embeddings
        self.rope_type = hf_config.rope_parameters["rope_type"]
        init = default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init(hf_config, device)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone().to(device), persistent=False)
        self.rope_forward = dynamic_rope_update(Rotary._tables)  # recomputes inv_freq for dynamic and longrope

    def _tables(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype=x.dtype), (emb.sin() * self.attention_scaling).to(
            dtype=x.dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, dh] of ``positions`` [T], in ``dtype``."""
        dummy = torch.empty(0, dtype=dtype, device=positions.device)
        with torch.no_grad():
            cos, sin = self.rope_forward(self, dummy, positions[None, :])
        return cos[0], sin[0]


def default_rope_parameters(config, device=None) -> tuple[torch.Tensor, float]:
    """``LlamaRotaryEmbedding.compute_default_rope_parameters``: the original RoPE's inverse frequencies."""
    base = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


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
