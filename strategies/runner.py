"""One rank's model runner: resident shards, the paged decode-layout KV cache, and a forward pass by any layout.

Every rank of a replica runs the same call with the same arguments (SPMD); the collectives inside keep them in step.
The driver receives logits from rank 0 (every rank has them after the vocab-parallel gather).
"""

from __future__ import annotations

import torch

from strategies.comm import Comm, CountingComm
from strategies.executor import LayoutPass
from strategies.kv_cache import Chunk, PackedChunks, PagedKVCache, block_bytes, table_slots
from strategies.layers import Rotary, lm_head_logits
from strategies.layout import REP, STRATEGY_NAMES, parse_layout
from strategies.layout_weights import LayoutWeights, StrategyUnavailable
from strategies.dtypes import dtype_name
from strategies.loader import Checkpoint
from strategies.packed import PackedLinear, Weight, can_pack, pack
from strategies.shapes import DEFAULT_BLOCK_SIZE
from strategies.sharding import RankWeights, load_rank_weights


class ShardRunner:
    """``num_blocks`` KV blocks are allocated at construction when given, else by ``allocate_kv`` once the engine has
    measured what fits (``kv_blocks_fit``) on every rank."""

    def __init__(self, model: str, comm: Comm, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 replica_budget_bytes: int = 0, weights: RankWeights | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: int | None = None, balanced: bool = True,
                 pack_weights: bool = True):
        self.comm = comm
        ckpt = Checkpoint(model)
        # ``weights``: shards already loaded elsewhere (the node's shared copy, placement/weight_store.py)
        self.weights = weights or load_rank_weights(ckpt, comm.rank, comm.world_size, dtype=dtype, device=device)
        self.shape, self.dtype, self.device = ckpt.shape, dtype, torch.device(device)
        self.rotary = Rotary(ckpt.config, device)
        self.block_size = block_size
        self.balanced = balanced  # zigzag token shards (False: contiguous, the benchmark's baseline)
        self.cache: PagedKVCache | None = None
        self.sources = LayoutWeights(self.weights, comm, replica_budget_bytes)
        self.lm_head: Weight = self.weights.lm_head
        if pack_weights and can_pack(self.device, dtype):  # the GEMMs' fast layout (strategies/packed.py)
            self.sources.pack_shards()
            self.lm_head = pack(self.weights.lm_head)
        if num_blocks:
            self.allocate_kv(num_blocks)

    # -- KV memory -------------------------------------------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        return block_bytes(self.shape.num_layers, self.weights.layout.kv_per_rank, self.shape.head_dim,
                           self.block_size, self.dtype.itemsize)

    def kv_blocks_fit(self, budget_bytes: int | None, utilization: float = 0.9, reserve_bytes: int = 0) -> int:
        """Blocks this rank can hold: a fixed budget, or on a GPU what is free on this rank's device now (after the
        weights, replicas and buffers are resident) less ``1 - utilization`` of the card and ``reserve_bytes`` of
        activations. Measured here, where the weights live, not guessed in the driver."""
        if budget_bytes is None:
            if self.device.type != "cuda":
                raise ValueError("a CPU device needs an explicit KV cache budget (kv_cache_memory_gb)")
            free, total = torch.cuda.mem_get_info(self.device)
            budget_bytes = int(free - (1 - utilization) * total - reserve_bytes)
        return max(0, budget_bytes // self.kv_block_bytes())

    def allocate_kv(self, num_blocks: int) -> int:
        """(Re)allocate the cache with ``num_blocks`` blocks; every rank must get the same number."""
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block: raise kv_cache_memory_gb")
        self.cache = None
        self.cache = PagedKVCache(self.shape.num_layers, num_blocks, self.block_size, self.weights.layout.kv_per_rank,
                                  self.shape.head_dim, self.dtype, self.device)
        return num_blocks

    def prepare(self, strategies: list[str]) -> None:
        """Build what these layouts keep resident (replicas, transposed shards) before KV memory is measured."""
        self.sources.prepare([parse_layout(s) for s in strategies])

    def fitting(self, strategies: list[str]) -> list[str]:
        """The longest run of ``strategies``, in order, skipping any that would not fit, whose replicas and transposed
        shards fit the budget together (nothing is built)."""
        kept: list[str] = []
        held: list = []  # their layouts
        for s in strategies:
            layout = parse_layout(s)
            if self.sources.fits([*held, layout]):
                kept.append(s)
                held.append(layout)
        return kept

    # -- what the driver calls -------------------------------------------------------------------------------------

    def forward(self, chunks: list[Chunk], strategy: str = "megatron", all_logits: bool = False) -> torch.Tensor:
        """One forward pass over ``chunks`` by ``strategy`` (a name or any layout label); logits of each chunk's last
        token, or of every token of a chunk marked ``all_logits`` (a prompt scored), in order [R, V] (of every token
        [T, V] with ``all_logits``). Only those rows go through the LM head. Each chunk's new K/V lands in the cache
        through its block table."""
        layout = parse_layout(strategy)
        if self.cache is None:
            raise RuntimeError("no KV cache: call allocate_kv first")
        batch = PackedChunks.build(chunks, self.block_size, self.device, self.dtype)
        cos, sin = self.rotary(batch.positions, self.dtype)
        wanted = None if all_logits else logit_rows(chunks, batch)
        with torch.inference_mode():
            run = LayoutPass(layout, self.weights, self.comm, self.cache, batch, cos, sin, self.balanced)
            hidden = run.run(self.sources.layers(layout))
            if layout.residual == REP:
                rows = hidden if wanted is None else hidden[wanted]
            else:
                rows = self._collect_rows(hidden, run.tok, wanted)
            return lm_head_logits(self.comm, self.lm_head, rows, self.shape.vocab_size)

    def collectives(self, chunks: list[Chunk], strategy: str) -> tuple[torch.Tensor, list[tuple[str, int]]]:
        """One serving forward pass of ``strategy``: its logits, and the collectives it issued as (kind, bytes of the
        whole tensor) in order: what the cost model's op list for the same work must name."""
        self.sources.prepare([parse_layout(strategy)])  # replicas are built once, not part of a pass
        counting, inner = CountingComm(self.comm), self.comm
        self.comm = self.sources.comm = counting
        try:
            logits = self.forward(chunks, strategy)
        finally:
            self.comm = self.sources.comm = inner
        return logits, counting.calls

    def step(self, parts: list[tuple[str, list[Chunk]]]) -> torch.Tensor:
        """An engine step: each part's chunks in one pass by its strategy (prefill chunks by the planner's pick, decode
        tokens by megatron); logits of every chunk's last token (of each of its tokens if it is marked
        ``all_logits``), in order [R, V]."""
        return torch.cat([self.forward(chunks, strategy) for strategy, chunks in parts if chunks])

    def export_kv(self, tables: list[tuple[list[int], int]]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """This rank's head-sharded K/V of sequences (block table, length), [layers, length, Hkv_local, dh] each."""
        out = []
        for blocks, n in tables:
            slots = table_slots(blocks, torch.arange(n), self.block_size).to(self.device)
            k, v = zip(*(self.cache.read(i, slots) for i in range(self.shape.num_layers)))
            out.append((n, torch.stack(k).cpu(), torch.stack(v).cpu()))
        return out

    def import_kv(self, tables: list[list[int]], kv: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Adopt K/V exported by the same rank of a prefill replica (same model, same device count) into blocks."""
        for blocks, (n, k, v) in zip(tables, kv, strict=True):
            slots = table_slots(blocks, torch.arange(n), self.block_size).to(self.device)
            for i in range(self.shape.num_layers):
                self.cache.write(i, slots, k[i].to(self.device), v[i].to(self.device))

    def available_strategies(self, layouts: list[str] | None = None) -> list[str]:
        """Those of ``layouts`` (default: the named ones) whose replicas fit the budget, each with what is built."""
        names = list(STRATEGY_NAMES) if layouts is None else layouts
        return [s for s in names if self.sources.fits([parse_layout(s)])]

    def dtype_name(self) -> str:
        """The dtype this rank computes in (what ``dtype: auto`` resolved to on its device)."""
        return dtype_name(self.dtype)

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds: resident shards, gather buffers, replicas and transposed shards (if built), the
        shards' and LM head's packed copies (if packed), the KV cache's blocks."""
        report = {"weights": self.weights.nbytes(), **self.sources.nbytes(),
                  "kv_cache": self.cache.nbytes() if self.cache is not None else 0}
        report["packed"] += self.lm_head.nbytes if isinstance(self.lm_head, PackedLinear) else 0
        return report

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _collect_rows(self, local: torch.Tensor, tok, wanted: list[int] | None) -> torch.Tensor:
        """Bring the hidden states the LM head needs (packed rows ``wanted``; None: every row) onto every rank (each
        lives on the rank owning the token; ``tok``: the pass's ``TokenShards``)."""
        if wanted is None:  # <- all-gather of hidden states (tests), back into packed order
            return tok.packed(self.comm.all_gather(local).flatten(0, 1))
        rows = torch.zeros((len(wanted), local.shape[1]), dtype=local.dtype, device=local.device)
        where = {g: i for i, g in enumerate(tok.mine.tolist())}
        for b, row in enumerate(wanted):
            if row in where:
                rows[b] = local[where[row]]
        return self.comm.all_reduce(rows)  # <- all-reduce of the wanted rows (each owned by one rank)


def logit_rows(chunks: list[Chunk], batch: PackedChunks) -> list[int]:
    """The packed rows whose logits a pass returns: each chunk's last, or all of a chunk marked ``all_logits``."""
    return [r for c, sp in zip(chunks, batch.spans)
            for r in (range(sp.start, sp.stop) if c.all_logits else (sp.stop - 1,))]


__all__ = ["ShardRunner", "StrategyUnavailable"]
