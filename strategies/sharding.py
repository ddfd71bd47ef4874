"""The one resident weight copy: each rank's Megatron shards, and how heads are dealt to ranks.

Every rank keeps
- Q/K/V rows of its heads (column-parallel) and the matching O columns (row-parallel),
- its slice of the gate/up rows (column-parallel) and of the down columns (row-parallel),
- its slice of the vocabulary rows of the embedding and LM head (vocab-parallel),
- the (tiny) norm weights, replicated.
A layer's four matrices live in one flat buffer, so ``weight_gathered`` rebuilds the whole layer with one all-gather
of that buffer and ``projection_replicated`` keeps such gathered buffers resident. Switching never reloads weights.

Heads that do not divide by p are padded with zero heads (a zero query head attends to zero values and meets zero O
columns: exact); when p > KV heads and p is a multiple of them, each KV head is replicated over p / Hkv ranks, as vLLM
does. Concatenating the ranks' blocks gives a padded "global" model that equals the original one exactly, which is
what the token-sharded strategies compute with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from strategies.layout import check_devices
from strategies.loader import Checkpoint
from strategies.shapes import ModelShape


@dataclass(frozen=True)
class HeadLayout:
    """Which original heads each rank owns; -1 is a zero (padding) head."""

    devices: int
    q_heads: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]
    ffn_per_rank: int
    vocab_per_rank: int

    @property
    def q_per_rank(self) -> int:
        return len(self.q_heads[0])

    @property
    def kv_per_rank(self) -> int:
        return len(self.kv_heads[0])


def head_layout(shape: ModelShape, devices: int) -> HeadLayout:
    """Deal heads to ``devices`` ranks by the rule the cost model also uses (``check_devices``), which raises
    ValueError naming the reason when the model cannot be split that way."""
    split = check_devices(shape, devices)
    p, hkv, group = devices, shape.num_kv_heads, shape.num_heads // shape.num_kv_heads
    if split.kv_replication > 1:  # each KV head on `rep` ranks, its query group split between them
        rep = split.kv_replication
        per_q = group // rep
        kv = [(r // rep,) for r in range(p)]
        q = [tuple((r // rep) * group + g for g in range((r % rep) * per_q, (r % rep + 1) * per_q)) for r in range(p)]
    else:  # KV heads (zero-padded to a multiple of p) dealt in blocks, each with its whole query group
        per = split.kv_heads_per_device
        kv = [tuple(k if k < hkv else -1 for k in range(r * per, (r + 1) * per)) for r in range(p)]
        q = [tuple(k * group + g if k >= 0 else -1 for k in ks for g in range(group)) for ks in kv]
    return HeadLayout(devices=p, q_heads=tuple(q), kv_heads=tuple(kv), ffn_per_rank=split.intermediate // p,
                      vocab_per_rank=math.ceil(shape.vocab_size / p))


def _rows(index: tuple[int, ...], block: int, read) -> torch.Tensor:
    """Stack blocks of ``block`` rows chosen by head index (-1 → zeros)."""
    parts = [read(slice(i * block, (i + 1) * block)) if i >= 0 else None for i in index]
    like = next((t for t in parts if t is not None), None)
    if like is None:
        like = read(slice(0, block))
        return torch.zeros((len(index) * block, *like.shape[1:]))
    return torch.cat([t if t is not None else torch.zeros_like(like) for t in parts])


def _range_rows(read, start: int, stop: int, total: int, cols: int) -> torch.Tensor:
    """Rows [start, stop) of a matrix with ``total`` rows, zero-padded past its end."""
    have = read(slice(min(start, total), min(stop, total))) if start < total else torch.zeros((0, cols))
    pad = stop - start - have.shape[0]
    return torch.cat([have, torch.zeros((pad, cols))]) if pad else have


@dataclass
class LayerShard:
    """One layer's shards on one rank; the four matrices are views into ``flat``."""

    flat: torch.Tensor
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor


@dataclass
class RankWeights:
    """Everything one rank keeps resident."""

    shape: ModelShape
    layout: HeadLayout
    rank: int
    layers: list[LayerShard]
    embed: torch.Tensor  # [V/p, E] vocab-parallel
    lm_head: torch.Tensor  # [V/p, E] vocab-parallel (the same tensor when tied)
    final_norm: torch.Tensor
    offsets: dict[str, tuple[int, tuple[int, int]]] = field(default_factory=dict)

    def block(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """View of matrix ``name`` in a flat layer buffer: [rows, cols] for one rank, or [p, rows, cols] gathered."""
        start, (rows, cols) = self.offsets[name]
        if flat.dim() == 1:
            return flat[start:start + rows * cols].view(rows, cols)
        return flat[:, start:start + rows * cols].unflatten(1, (rows, cols))

    def nbytes(self) -> int:
        tensors = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        tensors += [t for lay in self.layers for t in (lay.flat, lay.attn_norm, lay.mlp_norm)]
        return sum(t.numel() * t.element_size() for t in tensors)


def layer_offsets(shape: ModelShape, layout: HeadLayout) -> dict[str, tuple[int, tuple[int, int]]]:
    e, dh, f = shape.hidden_size, shape.head_dim, layout.ffn_per_rank
    sizes = {
        "qkv": ((layout.q_per_rank + 2 * layout.kv_per_rank) * dh, e),  # column-parallel
        "o": (e, layout.q_per_rank * dh),  # row-parallel
        "gate_up": (2 * f, e),  # column-parallel
        "down": (e, f),  # row-parallel
    }
    offsets, start = {}, 0
    for name, (r, c) in sizes.items():
        offsets[name] = (start, (r, c))
        start += r * c
    return offsets


def load_rank_weights(ckpt: Checkpoint, rank: int, devices: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> RankWeights:
    """Read only this rank's shards from the checkpoint (memory-mapped safetensors slices)."""
    shape = ckpt.shape
    layout = head_layout(shape, devices)
    offsets = layer_offsets(shape, layout)
    e, dh, f_all = shape.hidden_size, shape.head_dim, shape.intermediate_size
    f0, f1 = rank * layout.ffn_per_rank, (rank + 1) * layout.ffn_per_rank
    qh, kvh = layout.q_heads[rank], layout.kv_heads[rank]
    total = sum(r * c for _, (r, c) in offsets.values())
    layers = []
    for i in range(shape.num_layers):
        pre = f"model.layers.{i}."

        def reader(name: str):
            return lambda rows: ckpt.tensor(pre + name + ".weight", rows=rows)

        def col_reader(name: str):
            return lambda cols: ckpt.tensor(pre + name + ".weight", cols=cols).T

        qkv = torch.cat([
            _rows(qh, dh, reader("self_attn.q_proj")),
            _rows(kvh, dh, reader("self_attn.k_proj")),
            _rows(kvh, dh, reader("self_attn.v_proj")),
        ])
        o = _rows(qh, dh, col_reader("self_attn.o_proj")).T
        gate_up = torch.cat([
            _range_rows(reader("mlp.gate_proj"), f0, f1, f_all, e),
            _range_rows(reader("mlp.up_proj"), f0, f1, f_all, e),
        ])
        down = _range_rows(col_reader("mlp.down_proj"), f0, f1, f_all, e).T
        flat = torch.empty(total, dtype=dtype, device=device)
        for name, t in (("qkv", qkv), ("o", o), ("gate_up", gate_up), ("down", down)):
            start, (r, c) = offsets[name]
            flat[start:start + r * c].view(r, c).copy_(t)
        layers.append(LayerShard(
            flat=flat,
            attn_norm=ckpt.tensor(pre + "input_layernorm.weight").to(device, dtype),
            mlp_norm=ckpt.tensor(pre + "post_attention_layernorm.weight").to(device, dtype),
        ))
    v0, v1 = rank * layout.vocab_per_rank, (rank + 1) * layout.vocab_per_rank

    def vocab_rows(name: str) -> torch.Tensor:
        return _range_rows(lambda rows: ckpt.tensor(name, rows=rows), v0, v1, shape.vocab_size, e).to(device, dtype)

    embed = vocab_rows("model.embed_tokens.weight")
    lm_head = embed if shape.tie_word_embeddings else vocab_rows("lm_head.weight")
    return RankWeights(
        shape=shape, layout=layout, rank=rank, layers=layers, embed=embed, lm_head=lm_head,
        final_norm=ckpt.tensor("model.norm.weight").to(device, dtype), offsets=offsets,
    )
