"""The block manager of one replica's paged KV cache: which blocks are free, who holds which, and the prefix cache.

Block ids are the same on every rank (each rank stores its own KV heads of a block), so the engine decides here and
tells the ranks each sequence's block table. A full block's key is the SHA-256 of its parent block's key and its own
tokens, so a key names the whole prefix up to the block's end: a hit on a block's key alone implies every token before
it matches too (a 256-bit collision is out of reach; Python's ``hash()``, used before, is neither collision-resistant
nor chained through the parent's full value: vLLM moved to SHA-256 for this, CVE-2025-25183). A new sequence reuses the
blocks of its longest cached prefix (reference-counted) and computes only the rest. A block nobody holds stays cached
until it is needed for new tokens: the free list is kept in least-recently-freed order, and allocation evicts from its
front (LRU), as vLLM does.

The encoding is canonical, the same in every process and on every machine (an ingress computes the same chain for
prefix-aware routing): ``sha256(parent's 32-byte digest || each token id as a little-endian int64)``, the chain starting
at ``ROOT_HASH``. There are no extra keys today (no adapters, images or per-tenant salt); one would be appended after
the tokens, length-prefixed.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes  # a 32-byte SHA-256 digest
ROOT_HASH: BlockHash = hashlib.sha256(b"dynpart prefix cache v1").digest()  # the parent of a prompt's first block


def _packed(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian int64s (the canonical encoding)."""
    return struct.pack(f"<{len(tokens)}q", *tokens)


def _chained(parent: BlockHash, packed: bytes) -> BlockHash:
    return hashlib.sha256(parent + packed).digest()


def block_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """The key of a full block: its tokens and, through ``parent`` (the previous block's key), every token before it."""
    return _chained(parent, _packed(tokens))


def prefix_hashes(tokens: Sequence[int], block_size: int, limit: int | None = None) -> list[BlockHash]:
    """Keys of the full blocks of ``tokens`` (at most ``limit`` blocks), in order: the tokens are packed once, then each
    block is one SHA-256 over its parent's digest and its slice (``block_hash``'s encoding)."""
    n = len(tokens) // block_size if limit is None else min(limit, len(tokens) // block_size)
    data, step = _packed(tokens[:n * block_size]), 8 * block_size
    out, parent = [], ROOT_HASH
    for i in range(n):
        parent = _chained(parent, data[i * step:(i + 1) * step])
        out.append(parent)
    return out


class NoFreeBlocks(RuntimeError):
    """More blocks were asked for than are free (the scheduler checks ``num_free`` first)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # front: evict first
        self.refs = [0] * num_blocks
        self.hash_of: list[BlockHash | None] = [None] * num_blocks
        self.by_hash: dict[BlockHash, int] = {}
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
                self.hash_of[block] = None
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
        one token to compute (its logits give the next token). A block is reused only when its chained key matches,
        i.e. its whole prefix does. ``count``: the lookup counts in the hit rate (not a recompute after preemption)."""
        limit = (len(tokens) - 1) // self.block_size
        if not self.prefix_caching:
            return []
        found = []
        for h in prefix_hashes(tokens, self.block_size, limit):
            block = self.by_hash.get(h)
            if block is None:
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

    def register(self, block: int, parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
        """Record a block that has just been filled (its K/V computed) in the prefix cache, ``parent`` the key of the
        block before it (``ROOT_HASH`` for the first); returns its key."""
        h = block_hash(parent, tokens)
        if self.prefix_caching and h not in self.by_hash:
            self.by_hash[h] = block
            self.hash_of[block] = h
        return h

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
