"""Prefix-cache keys (``app.engine.blocks``): SHA-256 chained through the parent block's key, the same in every process,
and a cached block is reused only when its whole prefix matches (issue 23, item 4; vLLM's CVE-2025-25183).

No Ray, no model: the block manager is driven the way the engine drives it (allocate, register each filled block with
its parent's key, release, then match a new prompt).
"""

from __future__ import annotations

import os
import subprocess
import sys

from app.engine.blocks import ROOT_HASH, BlockManager, block_hash, prefix_hashes

BS = 2


def cache(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Compute ``tokens``' full blocks as the engine does (each registered with its parent's key), then free them:
    they stay in the prefix cache."""
    blocks = bm.allocate(len(tokens) // bm.block_size)
    parent = ROOT_HASH
    for i, b in enumerate(blocks):
        parent = bm.register(b, parent, tokens[i * bm.block_size:(i + 1) * bm.block_size])
    bm.release(blocks)
    return blocks


def test_same_last_block_after_different_prefixes_is_not_shared():
    a, b = [1, 2, 3, 4, 5, 6], [1, 9, 3, 4, 5, 6]  # the last two blocks equal, the first differs
    ha, hb = prefix_hashes(a, BS), prefix_hashes(b, BS)
    assert ha[0] != hb[0] and ha[1] != hb[1] and ha[2] != hb[2]
    assert all(isinstance(h, bytes) and len(h) == 32 for h in ha + hb)  # full SHA-256 digests
    assert ha == [block_hash(ROOT_HASH, a[:2]), block_hash(ha[0], a[2:4]), block_hash(ha[1], a[4:])]
    bm = BlockManager(num_blocks=8, block_size=BS)
    blocks = cache(bm, a)
    assert bm.match_prefix(a + [7]) == blocks
    bm.release(blocks)
    assert bm.match_prefix(b + [7]) == []


def test_keys_are_the_same_in_every_process():
    """An ingress and every replica compute the same chain whatever their ``PYTHONHASHSEED`` (routing relies on it)."""
    tokens = list(range(100, 140))
    code = "from app.engine.blocks import prefix_hashes; print(b''.join(prefix_hashes(list(range(100, 140)), 16)).hex())"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                text=True).stdout.strip())
    assert outs == {b"".join(prefix_hashes(tokens, 16)).hex()}


# A crafted collision of the old keys, ``hash((parent, tuple(tokens)))`` chained from 0. CPython hashes an int modulo
# M = 2**61 - 1, so two parents that differ by M give every child block the same key; its own tokens then matched, and
# a prompt got another prompt's K/V computed after a different prefix. CPython's tuple hash (xxHash-style) is invertible,
# which makes such a parent easy to find.
M, U = 2**61 - 1, 2**64
P1, P2, P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


def _signed(x: int) -> int:
    return x - U if x >= 2**63 else x


def _lane_for(lanes: list[int], length: int, target: int) -> int:
    """The hash the last item of a ``length``-tuple whose other items hash to ``lanes`` must have for the tuple to
    hash to ``target`` (inverting CPython 3.8+'s tuplehash on 64-bit)."""
    acc = P5
    for lane in lanes:
        acc = (acc + lane % U * P2) % U
        acc = ((acc << 31) | (acc >> 33)) % U * P1 % U
    x = (target - (length ^ (P5 ^ 3527539))) % U * pow(P1, -1, U) % U
    x = ((x >> 31) | (x << 33)) % U
    return _signed((x - acc) * pow(P2, -1, U) % U)


def _crafted_first_block(victim: list[int]) -> list[int]:
    """A first block, not ``victim``, whose old key differs from ``victim``'s by exactly M."""
    want = hash((0, tuple(victim)))
    want += M if want < 2**63 - M else -M
    for y0 in range(1, 1000):
        inner = _lane_for([0], 2, want)  # hash((0, inner)) == want
        y1 = _lane_for([y0], 2, inner)  # hash((y0, y1)) == inner, if y1 is an int hashing to itself
        if 0 <= y1 < M:
            assert hash((0, (y0, y1))) == want
            return [y0, y1]
    raise AssertionError("no crafted block found")


def test_a_crafted_parent_collision_gets_no_other_prompts_kv():
    x, z = [5, 6], [7, 8]
    y = _crafted_first_block(x)
    old_a, old_y = hash((0, tuple(x))), hash((0, tuple(y)))
    assert old_a != old_y and hash((old_a, tuple(z))) == hash((old_y, tuple(z)))  # the old keys of X+Z and Y+Z collide

    bm = BlockManager(num_blocks=8, block_size=BS)
    a_blocks = cache(bm, x + z)  # a victim's prompt: Z's K/V computed after X
    y_blocks = cache(bm, y + [9, 9])  # the attacker's first block is cached too
    hit = bm.match_prefix(y + z + [1])
    assert hit == y_blocks[:1], f"reused {hit}: block {a_blocks[1]} holds Z's K/V after X, not after Y"
