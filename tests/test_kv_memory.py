"""KV memory as a serving engine manages it: paged blocks, chunked prefill, prefix caching, preemption.

Every case compares greedy tokens with transformers' (the engine's scheduling must never change what is generated),
then checks the memory behaviour a user relies on: more sequences than the old fixed slots at once, prompts that
share a prefix computing only the rest, running out of blocks preempting and recomputing instead of failing, and
every block back in the free pool once requests end.
"""

from __future__ import annotations

import os

import pytest
from conftest import local_engine, prompts_for, reference_greedy

from app.engine.blocks import ROOT_HASH, BlockManager, prefix_hashes
from app.engine.llm_engine import LLMEngine
from app.engine.params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def references(path: str, prompts: list[list[int]], n: int = 12) -> list[list[int]]:
    return [reference_greedy(path, p, n) for p in prompts]


@pytest.mark.parametrize("budget", [5, 16, 2048])
def test_chunked_prefill_gives_the_same_tokens(tiny_models, budget):
    """Prompts read in chunks of a 5-token budget (shorter than a block, splitting blocks), of one block, or whole,
    while other sequences decode in the same steps."""
    path = tiny_models["gqa"]
    prompts = prompts_for(512, lengths=(40, 3, 23, 1), seed=budget)
    engine = local_engine(path, max_num_batched_tokens=budget)
    seqs = engine.generate(prompts, GREEDY)
    assert [s.output_ids for s in seqs] == references(path, prompts)
    assert engine.blocks.num_used == 0 and not engine.running


def test_a_long_prompt_does_not_stall_running_streams(tiny_models):
    """With chunking, a 200-token prompt arriving while a stream decodes is read 16 tokens per step and the stream
    gets a token every step; without it, the whole prompt is one step."""
    path = tiny_models["gqa"]
    short, long = prompts_for(512, lengths=(4, 200), seed=1)
    for chunked, steps_while_prefilling in ((True, 200 // 16), (False, 1)):
        engine = local_engine(path, max_num_batched_tokens=16, enable_chunked_prefill=chunked, max_model_len=256)
        stream = engine.add(short, SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        engine.step()
        before = len(stream.output_ids)
        late = engine.add(long, GREEDY)
        steps = 0
        while not late.output_ids:
            engine.step()
            steps += 1
        assert steps >= steps_while_prefilling
        assert len(stream.output_ids) - before == steps  # one token per step, prefill or not
        while engine.has_work():
            engine.step()
        assert late.output_ids == reference_greedy(path, long, 12)


def test_prefix_cache_hit_computes_only_the_rest(tiny_models):
    path = tiny_models["mha"]
    system = prompts_for(512, lengths=(50,), seed=7)[0]
    a, b = (system + tail for tail in prompts_for(512, lengths=(5, 9), seed=8))
    engine = local_engine(path)
    first = engine.generate([a], GREEDY)[0]
    second = engine.generate([b], GREEDY)[0]
    assert (first.cached_tokens, second.cached_tokens) == (0, 48)  # the system prompt's three full blocks
    assert [first.output_ids, second.output_ids] == references(path, [a, b])
    again = engine.generate([a], GREEDY)[0]  # the same prompt again: all but its last block's remainder
    assert again.cached_tokens == 48 and again.output_ids == first.output_ids
    assert engine.load().prefix_hit_rate == pytest.approx((48 + 48) / (len(a) + len(b) + len(a)))


def test_prefix_caching_off_recomputes(tiny_models):
    path = tiny_models["mha"]
    prompt = prompts_for(512, lengths=(40,), seed=7)[0]
    engine = local_engine(path, enable_prefix_caching=False)
    engine.generate([prompt], GREEDY)
    assert engine.generate([prompt], GREEDY)[0].cached_tokens == 0


def test_out_of_blocks_preempts_and_recomputes_the_same_tokens(tiny_models):
    """Six sequences that each grow to 3 blocks share 10 blocks: decode runs out, the newest are preempted and
    recomputed, and every sequence still produces transformers' tokens."""
    path = tiny_models["odd"]
    prompts = prompts_for(512, lengths=(14, 9, 12, 15, 3, 10), seed=2)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    engine = local_engine(path, max_num_seqs=6, num_blocks=10, max_model_len=48)
    seqs = engine.generate(prompts, params)
    assert engine.preemptions > 0
    assert [s.output_ids for s in seqs] == references(path, prompts, 24)
    assert engine.blocks.num_used == 0


def test_sequences_at_once_are_bounded_by_memory_not_slots(tiny_models):
    """48 short requests run together in one replica (the old engine ran 8)."""
    path = tiny_models["mqa"]
    prompts = prompts_for(512, lengths=(6,) * 48, seed=3)
    engine = local_engine(path, max_num_seqs=64, max_model_len=64, num_blocks=48 * 2)
    seqs = [engine.add(p, GREEDY) for p in prompts]
    engine.step()
    assert len(engine.running) == 48 and engine.blocks.num_used == 48
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in seqs[:3]] == references(path, prompts[:3])


def test_requests_larger_than_the_cache_are_refused(tiny_models):
    from app.engine.messages import RequestError

    engine = local_engine(tiny_models["mha"], num_blocks=4, max_model_len=256)
    with pytest.raises(RequestError, match="whole KV cache of 64 tokens"):
        engine.add([1] * 60, SamplingParams(max_tokens=8))


def test_block_manager_evicts_least_recently_freed_and_chains_keys():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(2)
    h = prefix_hashes([1, 2, 3, 4], 2)
    bm.register(a[0], ROOT_HASH, [1, 2])
    bm.register(a[1], h[0], [3, 4])
    bm.release(a)  # both cached, free; the tail block is evicted first
    assert bm.match_prefix([1, 2, 3, 4, 5]) == a and bm.num_free == 2
    bm.release(a)
    bm.allocate(3)  # the two never-used blocks, then the least recently freed cached one: the tail
    assert bm.match_prefix([1, 2, 3, 4, 5]) == [a[0]]
    assert bm.match_prefix([9, 9, 3, 4, 5]) == []  # a different first block: a different chain


@pytest.mark.parametrize("strategy", ["auto", "projection_replicated"])
def test_two_devices_chunked_with_prefix_hits(worker_groups, tiny_models, strategy):
    """On 2 shard workers, chunks by every strategy (token-sharded ones attending to the cached prefix) give
    transformers' tokens, for prompts that hit the prefix cache and prompts that do not."""
    path = tiny_models["gqa"]
    group = worker_groups.get(2, dict(model=path, block_size=4, num_blocks=64, replica_budget_bytes=2**30))
    engine = LLMEngine(group, None, [], num_blocks=64, block_size=4, max_model_len=128, max_num_seqs=4,
                       max_num_batched_tokens=7)
    system = prompts_for(512, lengths=(13,), seed=5)[0]
    prompts = [system + t for t in prompts_for(512, lengths=(6, 11, 2), seed=6)]
    first = engine.generate(prompts[:1], GREEDY, strategy)
    rest = engine.generate(prompts[1:], GREEDY, strategy)
    assert [s.output_ids for s in first + rest] == references(path, prompts)
    assert [s.cached_tokens for s in rest] == [12, 12]
    if strategy != "auto":
        assert {s.prefill_strategy for s in first + rest} == {strategy}


def test_the_planner_chooses_each_chunk_with_its_cached_prefix(tiny_models):
    """The strategy of a step's prefill chunks is asked of the planner with their token counts and the prefix each
    attends to (earlier chunks, or a prefix-cache hit), not once per prompt."""
    path = tiny_models["gqa"]
    asked = []

    def choose(new: list[int], cached: list[int], decoding: list[int]) -> str:
        asked.append((new, cached))
        assert decoding == []  # nothing else runs
        return "megatron"

    engine = local_engine(path, max_num_batched_tokens=16, choose_strategy=choose)
    prompt = prompts_for(512, lengths=(40,), seed=9)[0]
    engine.generate([prompt], GREEDY)
    assert asked == [([16], [0]), ([16], [16]), ([8], [32])]
    asked.clear()
    engine.generate([prompt[:32] + [7, 8, 9]], GREEDY)  # two cached blocks, three new tokens
    assert asked == [([3], [32])]


def test_the_step_trace_says_what_each_step_ran(tiny_models, tmp_path, monkeypatch):
    """``DYNPART_STEP_TRACE``: one JSON line per step, with each pass's tokens per sequence (how the "Cores"
    measurement found its slow steps): here a 40-token prompt read in 16-token chunks beside a decoding stream."""
    import json

    from app.engine.llm_engine import STEP_TRACE_ENV

    trace = tmp_path / "steps.jsonl"
    monkeypatch.setenv(STEP_TRACE_ENV, str(trace))
    engine = local_engine(tiny_models["gqa"], max_num_batched_tokens=17)
    engine.generate(prompts_for(512, lengths=(1, 40)), SamplingParams(max_tokens=6, ignore_eos=True))
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    tokens = [sorted(n for _, seqs in s["passes"] for n in seqs) for s in steps]
    assert tokens[:4] == [[1, 16], [1, 16], [1, 8], [1, 1]]  # the stream's token rides along each chunk
    assert all(s["forward_ms"] > 0 and s["pid"] == os.getpid() for s in steps)
    assert sum(n for t in tokens for n in t) == 1 + 40 + 2 * 5  # every token computed, each in one step
