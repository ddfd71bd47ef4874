"""Partitioned execution on p real shard workers (Ray actors, gloo): every strategy, every p, exact.

For each model shape and p, one group of workers runs every named strategy on a batch of prompts of different
lengths through non-contiguous block tables: the production path's last-token logits and all-token logits equal
transformers' (float32, max abs diff <= 1e-4), 16 greedy Megatron decode steps after the KV handoff give
transformers' tokens, and so do chunked prefills of every chunk size and prefills after a prefix-cache hit. (Every
layout of the executable front, the named ones included, is checked whole-prompt in ``test_layouts.py``.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPES, prompts_for, reference_greedy, reference_logits

from app.engine.build import EngineOptions, build_engine
from placement.workers import start_group
from strategies.kv_cache import Chunk
from strategies.layout import STRATEGY_NAMES
from strategies.loader import Checkpoint
from strategies.layout_weights import StrategyUnavailable

DECODE_STEPS = 16
BLOCK = 4  # small blocks: the tiny prompts span several, and chunks split them
NUM_BLOCKS = 96


def block_tables(lengths: list[int], extra: int = DECODE_STEPS + 1) -> list[list[int]]:
    """Non-contiguous block tables (blocks handed out from a shuffled pool), room for ``extra`` more tokens each."""
    pool = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(len(lengths))).tolist()
    tables = []
    for n in lengths:
        need = -(-(n + extra) // BLOCK)
        tables.append([pool.pop() for _ in range(need)])
    return tables


def runner_kwargs(path: str, **extra) -> dict:
    return {**dict(model=path, block_size=BLOCK, num_blocks=NUM_BLOCKS, replica_budget_bytes=2**30), **extra}


def chunked(prompts: list[list[int]], tables: list[list[int]], size: int) -> list[list[Chunk]]:
    """Passes that feed every prompt ``size`` tokens at a time, all prompts packed into each pass."""
    passes, done = [], [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        chunks = []
        for i, p in enumerate(prompts):
            if done[i] < len(p):
                chunks.append(Chunk(p[done[i]:done[i] + size], done[i], tables[i]))
                done[i] += len(chunks[-1].ids)
        passes.append(chunks)
    return passes


def check_group(group, path: str, prompts: list[list[int]], decode_steps: int = DECODE_STEPS) -> None:
    refs = [reference_logits(path, p) for p in prompts]
    ref_logits = torch.cat(refs)
    ref_tokens = [reference_greedy(path, p, decode_steps + 1) for p in prompts]
    last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    tables = block_tables([len(p) for p in prompts])
    whole = [Chunk(p, 0, t) for p, t in zip(prompts, tables)]
    for strategy in STRATEGY_NAMES:
        served = group.call("forward", whole, strategy)  # the serving path: only each prompt's last row leaves
        diff = (served - ref_logits[last]).abs().max().item()
        assert served.shape == (len(prompts), ref_logits.shape[-1]) and diff <= 1e-4, f"{strategy}: last-token {diff}"
        logits = group.call("forward", whole, strategy, True)
        diff = (logits - ref_logits).abs().max().item()
        assert diff <= 1e-4, f"{strategy}: prefill logits differ by {diff}"
        tokens = [logits[last].argmax(-1).tolist()]
        for step in range(decode_steps):
            chunks = [Chunk([t], len(p) + step, tb) for t, p, tb in zip(tokens[-1], prompts, tables)]
            tokens.append(group.call("forward", chunks).argmax(-1).tolist())
        assert [list(t) for t in zip(*tokens)] == ref_tokens, f"{strategy}: decode after handoff differs"
    one_token = [Chunk([prompts[0][0]], 0, tables[0])]  # fewer tokens than devices: most ranks hold only padding
    for strategy in STRATEGY_NAMES:
        logits = group.call("forward", one_token, strategy, True)
        assert (logits - reference_logits(path, one_token[0].ids)).abs().max().item() <= 1e-4, strategy


def check_chunks_and_prefixes(group, path: str, prompts: list[list[int]], sizes: tuple[int, ...] = (3, 7)) -> None:
    """Chunked prefill (chunks of 3 and 7 tokens: shorter than p = 4, splitting blocks, tails of one token) and
    prefix-cache hits (a second prompt reusing the first's full blocks) give transformers' logits, by every
    strategy."""
    refs = [reference_logits(path, p) for p in prompts]
    tables = block_tables([len(p) for p in prompts], extra=0)
    for size in sizes:
        for strategy in STRATEGY_NAMES:
            got = [[] for _ in prompts]
            for chunks in chunked(prompts, tables, size):
                logits = group.call("forward", chunks, strategy, True)
                at = 0
                for c in chunks:
                    got[next(i for i, t in enumerate(tables) if t is c.blocks)].append(logits[at:at + len(c.ids)])
                    at += len(c.ids)
            for i, ref in enumerate(refs):
                diff = (torch.cat(got[i]) - ref).abs().max().item()
                assert diff <= 1e-4, f"{strategy}, chunks of {size}: prompt {i} logits differ by {diff}"
    base = prompts[1]  # the longest: its first full blocks are the shared prefix
    hits = 2 * BLOCK
    other = base[:hits] + prompts_for(512, lengths=(9,), seed=len(base))[0]
    ref = reference_logits(path, other)[hits:]
    spare = sorted(set(range(NUM_BLOCKS)) - {b for t in tables for b in t})
    for strategy in STRATEGY_NAMES:
        group.call("forward", [Chunk(base, 0, tables[1])], "megatron")  # the prefix's K/V, as a cache hit finds it
        hit = Chunk(other[hits:], hits, tables[1][:2] + spare[:3])
        logits = group.call("step", [(strategy, [hit])])  # last row only, as the engine asks
        assert (logits - ref[-1:]).abs().max().item() <= 1e-4, f"{strategy}: prefix hit, last token"
        logits = group.call("forward", [hit], strategy, True)
        assert (logits - ref).abs().max().item() <= 1e-4, f"{strategy}: prefix hit"


@pytest.mark.parametrize("devices", [1, 2, 3, 4])
def test_every_strategy_is_exact(worker_groups, tiny_models, devices):
    """All shapes through one group of workers per p (the workers load each model in turn)."""
    for i, shape in enumerate(sorted(TINY_SHAPES)):
        group = worker_groups.get(devices, runner_kwargs(tiny_models[shape]))
        prompts = prompts_for(512, lengths=(7, 19, 3), seed=devices)
        # Every front layout, named ones included, runs whole prompts with decode at every p > 1 in
        # test_layouts.py; here 16 decode steps and a one-token prompt on one shape per p, chunks and prefix hits on
        # each shape at two device counts, and everything at p = 1 (one process, cheap)
        if i == 0 or devices == 1:
            check_group(group, tiny_models[shape], prompts)
        if (i + devices) % 2 == 1 or devices == 1:
            check_chunks_and_prefixes(group, tiny_models[shape], prompts)


def test_a_group_driven_from_its_rank0_is_exact_and_fails_at_once_when_a_rank_dies(ray_session, tiny_models):
    """An engine replica is rank 0 of its own group (``local_rank0``: it holds bundle 0, its step runs on a thread of
    its process, and rank 0's logits never go through the object store): transformers' logits and tokens. When
    another rank has died, a call raises at once (not after the 30 s collective timeout: the caller keeps watching
    the actor ranks while rank 0 waits in its collective), and the group still shuts down."""
    import os
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from placement.bundles import default_bundle
    from placement.workers import ShardGroup

    bundle = default_bundle()
    pg = placement_group([bundle] * 2, strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    path = tiny_models["gqa"]
    try:
        group = ShardGroup(2, runner_kwargs(path), placement_group=pg, bundle=bundle, local_rank0=True,
                           collective_timeout_s=30)
        try:
            pids = group.pids()
            assert pids[0] == os.getpid() and pids[1] != os.getpid() and len(group.workers) == 1, pids
            check_group(group, path, prompts_for(512, lengths=(7, 19, 3), seed=5), decode_steps=2)
            ray.kill(group.workers[0])
            t0 = time.monotonic()
            with pytest.raises(ray.exceptions.RayActorError):
                group.call("forward", [Chunk([1, 2, 3], 0, [0])], "megatron")
            assert time.monotonic() - t0 < 10
        finally:
            group.shutdown()
    finally:
        remove_placement_group(pg)


def test_contiguous_token_shards_are_exact_too(worker_groups, tiny_models):
    """The benchmark's baseline (``balanced=False``: one contiguous token shard per rank) computes the same logits."""
    path = tiny_models["odd"]
    group = worker_groups.get(3, runner_kwargs(path, balanced=False))
    check_chunks_and_prefixes(group, path, prompts_for(512, lengths=(7, 19, 3), seed=11), sizes=(7,))


def test_one_weight_copy_split_over_workers(worker_groups, tiny_models):
    """Each worker holds about 1/p of the weights; the gather buffer is two layers; replicas only once built."""
    path = tiny_models["gqa"]
    single = start_group(1, runner_kwargs(path))
    whole = single.call("memory_report")["weights"]
    group = worker_groups.get(2, runner_kwargs(path))
    group.call("forward", [Chunk([1, 2, 3], 0, [0])], "weight_gathered")
    reports = group.call_all("memory_report")
    layer_bytes = whole / Checkpoint(path).shape.num_layers
    for r in reports:
        assert 0.45 * whole <= r["weights"] <= 0.55 * whole
        assert r["replicas"] == 0
        assert 0 < r["gather_buffer"] <= 2 * layer_bytes  # two layers of full weights, reused
    group.call("forward", [Chunk([1, 2, 3], 0, [0])], "projection_replicated")
    assert all(r["replicas"] > 0 for r in group.call_all("memory_report"))


def test_the_replica_budget_is_measured_in_each_worker_less_the_kv_reservation(worker_groups, tiny_models,
                                                                               chat_tiny):
    """No budget given: each worker measures its own (after loading its shards) and leaves the KV cache's promised
    memory alone; a pool's ``replica_budget_gb`` caps it."""
    path = tiny_models["mha"]
    for kv_reserve, expect in ((0, True), (2**50, False)):
        group = worker_groups.get(2, runner_kwargs(path, replica_budget_bytes=None, kv_reserve_bytes=kv_reserve))
        assert ("projection_replicated" in group.call("available_strategies")) is expect, kv_reserve
    engine = build_engine(EngineOptions(model=chat_tiny, devices=2, replica_budget_gb=0, max_model_len=64))
    try:
        assert "projection_replicated" not in engine.group.call("available_strategies")
    finally:
        engine.group.shutdown()


def test_replicas_that_do_not_fit_make_the_strategy_unavailable(worker_groups, tiny_models):
    path = tiny_models["mha"]
    group = worker_groups.get(2, runner_kwargs(path, replica_budget_bytes=1024))
    assert group.call("available_strategies") == ["megatron", "weight_gathered"]
    with pytest.raises(StrategyUnavailable, match="over the budget"):
        group.call("forward", [Chunk([1, 2, 3], 0, [0])], "projection_replicated")
    # the group is still healthy: the other strategies and decode work
    group.call("forward", [Chunk([1, 2, 3], 0, [1])], "weight_gathered")
    assert group.call("forward", [Chunk([4], 3, [1])]).shape[0] == 1


def test_bad_requests_fail_before_any_worker_starts(tiny_models, monkeypatch):
    with pytest.raises(ValueError, match="more than this machine offers"):
        build_engine(EngineOptions(model=tiny_models["mha"], devices=64))
    monkeypatch.setenv("DYNPART_MAX_CPU_DEVICES", "8")
    with pytest.raises(ValueError, match="cannot be split over 5 devices"):
        build_engine(EngineOptions(model=tiny_models["mha"], devices=5))
    with pytest.raises(ValueError, match="unknown model"):
        build_engine(EngineOptions(model="llama-9000", devices=2))
    with pytest.raises(ValueError, match="unknown prefill strategy"):
        start_group(1, runner_kwargs(tiny_models["mha"])).call("forward", [Chunk([1], 0, [0])], "ring")
