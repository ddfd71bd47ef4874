"""One rank's model runner: resident shards, decode-layout KV cache, and a prefill by any strategy.

Every rank of a replica runs the same call with the same arguments (SPMD); the collectives inside keep them in step.
The driver receives logits from rank 0 (every rank has them after the vocab-parallel gather).
"""

from __future__ import annotations

import torch

from strategies.comm import Comm
from strategies.kv_cache import KVCache
from strategies.layers import Rotary, SequenceSpan, lm_head_logits
from strategies.layout import STRATEGY_NAMES, check_strategy
from strategies.loader import Checkpoint
from strategies.megatron import megatron_forward
from strategies.projection_replicated import ReplicatedLayers, StrategyUnavailable
from strategies.sharding import RankWeights, load_rank_weights
from strategies.token_sharded import token_chunk, token_sharded_forward
from strategies.weight_gathered import GatheredLayers


class ShardRunner:
    def __init__(self, model: str, comm: Comm, slots: int, capacity: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", replica_budget_bytes: int = 0, weights: RankWeights | None = None):
        self.comm = comm
        ckpt = Checkpoint(model)
        # ``weights``: shards already loaded elsewhere (the node's shared copy, placement/weight_store.py)
        self.weights = weights or load_rank_weights(ckpt, comm.rank, comm.world_size, dtype=dtype, device=device)
        self.shape, self.dtype, self.device = ckpt.shape, dtype, torch.device(device)
        self.rotary = Rotary(ckpt.config, device)
        self.cache = KVCache(self.shape.num_layers, slots, capacity, self.weights.layout.kv_per_rank,
                             self.shape.head_dim, dtype, device)
        self.gathered = GatheredLayers(self.weights, comm)
        self.replicated = ReplicatedLayers(self.weights, comm, replica_budget_bytes)

    # -- what the driver calls -------------------------------------------------------------------------------------

    def prefill(self, prompts: list[list[int]], slots: list[int], strategy: str = "megatron",
                all_logits: bool = False) -> torch.Tensor:
        """Prefill new sequences into empty ``slots``; return logits of each prompt's last token [B, V]
        (or of every token [T, V] with ``all_logits``)."""
        check_strategy(strategy)
        spans, start = [], 0
        for ids, slot in zip(prompts, slots, strict=True):
            self.cache.check_room(slot, len(ids))
            if self.cache.lengths[slot]:
                raise ValueError(f"slot {slot} is in use: release it before a new prefill")
            spans.append(SequenceSpan(start=start, length=len(ids), slot=slot))
            start += len(ids)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(len(p), device=self.device) for p in prompts])
        cos, sin = self.rotary(positions, self.dtype)
        with torch.inference_mode():
            if strategy == "megatron":
                hidden = megatron_forward(self.weights, self.comm, self.cache, ids, cos, sin, spans)
                rows = hidden if all_logits else hidden[[sp.stop - 1 for sp in spans]]
            else:
                source = self.gathered if strategy == "weight_gathered" else self.replicated.materialise()
                local, t0 = token_sharded_forward(self.weights, self.comm, self.cache, ids, cos, sin, spans, source)
                rows = self._collect_rows(local, t0, ids.shape[0], spans, all_logits)
            logits = lm_head_logits(self.comm, self.weights.lm_head, rows, self.shape.vocab_size)
        for sp in spans:
            self.cache.commit(sp.slot, sp.length)
        return logits

    def decode(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        """One Megatron decode step: append one token to each slot's sequence; return next-token logits [B, V]."""
        spans = []
        for b, slot in enumerate(slots):
            self.cache.check_room(slot, 1)
            spans.append(SequenceSpan(start=b, length=1, slot=slot, cached=self.cache.lengths[slot]))
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        positions = torch.tensor([sp.cached for sp in spans], device=self.device)
        cos, sin = self.rotary(positions, self.dtype)
        with torch.inference_mode():
            hidden = megatron_forward(self.weights, self.comm, self.cache, ids, cos, sin, spans)
            logits = lm_head_logits(self.comm, self.weights.lm_head, hidden, self.shape.vocab_size)
        for sp in spans:
            self.cache.commit(sp.slot, 1)
        return logits

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.cache.release(slot)

    def export_kv(self, slots: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """This rank's head-sharded K/V of each slot, [layers, Hkv_local, length, dh] each, for a decode replica."""
        out = []
        for slot in slots:
            n = self.cache.lengths[slot]
            k = torch.stack([layer[slot, :, :n] for layer in self.cache.k]).cpu()
            v = torch.stack([layer[slot, :, :n] for layer in self.cache.v]).cpu()
            out.append((n, k, v))
        return out

    def import_kv(self, slots: list[int], kv: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Adopt K/V exported by the same rank of a prefill replica (same model, same device count)."""
        for slot, (n, k, v) in zip(slots, kv, strict=True):
            self.cache.release(slot)
            self.cache.check_room(slot, n)
            for i in range(self.shape.num_layers):
                self.cache.k[i][slot, :, :n] = k[i].to(self.device)
                self.cache.v[i][slot, :, :n] = v[i].to(self.device)
            self.cache.commit(slot, n)

    def available_strategies(self) -> list[str]:
        return [s for s in STRATEGY_NAMES if s != "projection_replicated" or self.replicated.fits()]

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds: resident shards, gather buffer, replicas (if built), KV cache in use."""
        kv_token = 2 * self.shape.num_layers * self.weights.layout.kv_per_rank * self.shape.head_dim
        return {
            "weights": self.weights.nbytes(),
            "gather_buffer": self.gathered.nbytes(),
            "replicas": self.replicated.nbytes(),
            "kv_cache_in_use": self.cache.tokens_in_use() * kv_token * self.dtype.itemsize,
        }

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _collect_rows(self, local: torch.Tensor, t0: int, total: int, spans: list[SequenceSpan],
                      all_logits: bool) -> torch.Tensor:
        """Bring the hidden states the LM head needs onto every rank (they live on the rank owning the token)."""
        if all_logits:
            return self.comm.all_gather(local).flatten(0, 1)[:total]  # <- all-gather of hidden states (tests)
        rows = torch.zeros((len(spans), local.shape[1]), dtype=local.dtype, device=local.device)
        tc = token_chunk(total, self.comm.world_size)
        for b, sp in enumerate(spans):
            if t0 <= sp.stop - 1 < t0 + tc:
                rows[b] = local[sp.stop - 1 - t0]
        return self.comm.all_reduce(rows)  # <- all-reduce of the B last-token rows (each owned by one rank)


__all__ = ["ShardRunner", "StrategyUnavailable"]
