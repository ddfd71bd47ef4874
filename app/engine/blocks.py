"""The block manager of one replica's paged KV cache: which blocks are free, who holds which, and the prefix cache.

Block ids are the same on every rank (each rank stores its own KV heads of a block), so the engine decides here and
tells the ranks each sequence's block table. A full block is hashed by its tokens chained to the hash of the block
before it, so equal hashes mean equal prefixes; a new sequence reuses the blocks of its longest cached prefix
(reference-counted) and computes only the rest. A block nobody holds stays cached until it is needed for new tokens:
the free list is kept in least-recently-freed order, and allocation evicts from its front (LRU), as vLLM does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

ROOT_HASH = 0


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """The hash of a full block: its tokens and, through ``parent``, every token before it. Python hashes ints and
    tuples of ints the same in every process, so an ingress can compute the same chain (prefix-aware routing)."""
    return hash((parent, tuple(tokens)))


def prefix_hashes(tokens: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """Hashes of the full blocks of ``tokens`` (at most ``limit`` blocks), in order."""
    out, parent = [], ROOT_HASH
    n = len(tokens) // block_size if limit is None else min(limit, len(tokens) // block_size)
    for i in range(n):
        parent = block_hash(parent, tokens[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class NoFreeBlocks(RuntimeError):
    """More blocks were asked for than are free (the scheduler checks ``num_free`` first)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # front: evict first
        self.refs = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found cached

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise NoFreeBlocks(f"{n} blocks asked, {len(self.free)} free")
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)  # the least recently freed: evicted from the prefix cache
            if self.hash_of[block] is not None:
                if self.by_hash.get(self.hash_of[block]) == block:
                    del self.by_hash[self.hash_of[block]]
                self.hash_of[block] = self.tokens_of[block] = None
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free (tail blocks evicted first)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None

    def match_prefix(self, tokens: Sequence[int], count: bool = True) -> list[int]:
        """Take a reference to the cached blocks of ``tokens``' longest cached prefix of full blocks, leaving at least
        one token to compute (its logits give the next token). ``count``: the lookup counts in the hit rate (not a
        recompute after preemption)."""
        limit = (len(tokens) - 1) // self.block_size
        if not self.prefix_caching:
            return []
        found = []
        for i, h in enumerate(prefix_hashes(tokens, self.block_size, limit)):
            block = self.by_hash.get(h)
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            if block is None or self.tokens_of[block] != chunk:  # absent, or a hash collision
                break
            found.append(block)
        for block in found:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
        if count:
            self.queried_tokens += len(tokens)
            self.hit_tokens += len(found) * self.block_size
        return found

    def register(self, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Record a block that has just been filled (its K/V computed) in the prefix cache; returns its hash."""
        h = block_hash(parent, tokens)
        if self.prefix_caching and h not in self.by_hash:
            self.by_hash[h] = block
            self.hash_of[block], self.tokens_of[block] = h, tuple(tokens)
        return h

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
