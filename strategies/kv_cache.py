"""The decode-layout KV cache of one rank: keys and values of this rank's KV heads only (sharded by KV head).

Sequences own slots; a slot holds up to ``capacity`` tokens. Every prefill strategy writes its K/V here in this
layout, which is what makes the handoff to Megatron decode free. Storage is ``torch.empty``: pages are touched only
as sequences fill them, so a large capacity costs address space, not memory.
"""

from __future__ import annotations

import torch


class KVCacheFull(RuntimeError):
    """A sequence would exceed its slot's capacity."""


class KVCache:
    def __init__(self, num_layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.capacity = capacity
        shape = (slots, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def check_room(self, slot: int, new_tokens: int) -> None:
        if not 0 <= slot < self.slots:
            raise KVCacheFull(f"slot {slot} does not exist (cache has {self.slots})")
        if self.lengths[slot] + new_tokens > self.capacity:
            raise KVCacheFull(f"slot {slot}: {self.lengths[slot]} + {new_tokens} tokens exceed capacity {self.capacity}")

    def write(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [L, Hkv_local, dh] of new tokens after the slot's cached ones (length advances in ``commit``)."""
        start = self.lengths[slot]
        self.k[layer][slot, :, start:start + k.shape[0]] = k.transpose(0, 1)
        self.v[layer][slot, :, start:start + v.shape[0]] = v.transpose(0, 1)

    def read(self, layer: int, slot: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [L, Hkv_local, dh] of everything cached plus the ``new_tokens`` just written (views, no copy)."""
        n = self.lengths[slot] + new_tokens
        return self.k[layer][slot, :, :n].transpose(0, 1), self.v[layer][slot, :, :n].transpose(0, 1)

    def commit(self, slot: int, new_tokens: int) -> None:
        self.lengths[slot] += new_tokens

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def tokens_in_use(self) -> int:
        return sum(self.lengths)
