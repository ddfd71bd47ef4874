"""Each step sized by the TPOT target (``app/engine/step_budget.py``), on the real engine with a tiny model.

The predictor is the real one (the CPU catalog's planner; with ``learns=False`` its predictions are the planner's as
calibrated, so every chunk length below is reproducible): a long prompt arriving while streams decode is read in
chunks whose predicted step fits the target, alone it is one chunk, the tokens never change, a learned correction
shrinks the chunks, and a target the streams alone miss still lets the prompt progress one block per step.
"""

from __future__ import annotations

import pytest
from conftest import local_engine, prompts_for, reference_greedy

from app.engine.predictor import StepPredictor
from app.engine.params import SamplingParams
from app.engine.step_budget import (RIDE_STEP, SLOWDOWN, STEP_SHARE, StepBudget, coarse_prefix, deadline_floor,
                                     paced_wait_s)
from cost import get_hardware
from cost.correction import Correction
from strategies.loader import Checkpoint

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
STREAM = SamplingParams(max_tokens=120, ignore_eos=True)
CAP = 512


def predictor(path: str, learns: bool = False) -> StepPredictor:
    return StepPredictor(Checkpoint(path).shape, get_hardware("cpu"), 1, ["megatron"], learns=learns)


def chunk_s(pred: StepPredictor, n: int, prefix: int, decoding: list[int]) -> float:
    return pred.plan("auto", [n], [prefix], decoding).corrected_s


def chunks_of(engine, prompt: list[int], streams: int) -> list[tuple[int, int, list[int]]]:
    """(chunk, its prefix, the streams' contexts) of each step that read ``prompt``, ``streams`` decoding beside it."""
    for p in prompts_for(512, lengths=(5,) * streams, seed=3):
        engine.add(p, STREAM)
    for _ in range(3):
        engine.step()
    late = engine.add(prompt, GREEDY)
    out = []
    while not late.output_ids:
        prefix, decoding = late.num_computed, [s.num_computed for s in engine.running if not s.prefilling]
        engine.step()
        out.append((late.num_computed - prefix, prefix, decoding))
    return out


def test_a_long_prompt_beside_streams_is_chunked_to_the_target(tiny_models):
    path = tiny_models["gqa"]
    pred = predictor(path)
    tpot = chunk_s(pred, 64, 0, [RIDE_STEP] * 2) / STEP_SHARE  # the target: a 64-token chunk beside two streams
    engine = local_engine(path, max_model_len=512, max_num_batched_tokens=CAP, predictor=pred, tpot_s=tpot)
    prompt = prompts_for(512, lengths=(300,), seed=5)[0]
    chunks = chunks_of(engine, prompt, streams=2)
    assert len(chunks) >= 300 // 80  # split, not one 300-token step
    for n, prefix, decoding in chunks[:-1]:  # the last is what was left
        assert n % 16 == 0 and n >= 16
        assert chunk_s(pred, n, prefix, decoding) <= tpot * STEP_SHARE  # its predicted step fits
        # and is the most that does as priced (prefix and contexts rounded up, so the prediction errs long)
        assert chunk_s(pred, n + 16, coarse_prefix(prefix), [RIDE_STEP] * 2) > tpot * STEP_SHARE
    while engine.has_work():
        engine.step()
    assert engine.running == [] and engine.step_budget.sized >= len(chunks)


def test_beside_streams_the_expected_wait_is_the_paced_prefill(tiny_models):
    """Admission and the router read ``EngineLoad.wait_s``: beside decoding streams a waiting prompt is read one
    target-sized chunk a step, so its wait is those steps at the TPOT target (the streams outlast it here), longer
    than a lone prefill of it."""
    path = tiny_models["gqa"]
    pred = predictor(path)
    tpot = chunk_s(pred, 32, 0, [RIDE_STEP] * 2) / STEP_SHARE
    engine = local_engine(path, max_model_len=512, max_num_batched_tokens=CAP, predictor=pred, tpot_s=tpot)
    prompt = prompts_for(512, lengths=(300,), seed=5)[0]
    assert engine.step_budget.last_chunk is None  # nothing cut yet: prompts are read whole
    chunks_of(engine, prompts_for(512, lengths=(300,), seed=8)[0], streams=2)  # sizes a chunk beside the streams
    chunk = engine.step_budget.last_chunk
    assert 16 <= chunk < 300
    engine.add(prompt, GREEDY)
    load = engine.load()
    assert load.waiting_prompt_tokens == 300
    prefill_wait = load.wait_s - load.slot_wait_s  # (the sequence slots are full too: that part is the decode's)
    assert prefill_wait == pytest.approx(-(-300 // chunk) * tpot)
    assert prefill_wait > engine.predict_prefill_s(300)
    assert load.paced_s == pytest.approx(prefill_wait - engine.predict_prefill_s(300))  # what the router adds
    while engine.has_work():
        engine.step()
    assert engine.load().wait_s == 0.0  # nothing waiting


def test_the_paced_wait_lasts_as_long_as_the_streams():
    """The expected wait beside streams is paced only while some stream decodes: once the streams end, the rest of
    the prompts read at a lone prefill's speed; each prompt read decodes itself, pacing the ones behind it. (A paced
    wait priced as if the streams never ended answered 503 to prompts a replica would have read in time.)"""
    def alone(tokens: int) -> float:
        return tokens * 0.001
    tpot, chunk = 0.4, 16
    # one stream with 3 tokens left: 3 paced steps read 48 tokens, the other 152 read alone
    assert paced_wait_s([(200, 1, None)], [3], chunk, tpot, alone) == pytest.approx(3 * tpot + 0.152)
    # a stream that outlasts the prompt paces all of it: 13 steps of 16 tokens
    assert paced_wait_s([(200, 1, None)], [50], chunk, tpot, alone) == pytest.approx(13 * tpot)
    # no stream: the first prompt is read alone, then decodes (10 tokens: 9 after its first) beside the second
    assert paced_wait_s([(100, 10, None), (200, 1, None)], [], chunk, tpot, alone) == \
        pytest.approx(0.1 + 9 * tpot + 0.056)
    # a prompt that generates one token only does not become a stream
    assert paced_wait_s([(100, 1, None), (200, 1, None)], [], chunk, tpot, alone) == pytest.approx(0.3)
    # the budget has not cut a prompt yet: every prompt priced alone
    assert paced_wait_s([(100, 10, None), (200, 1, None)], [50], 0, tpot, alone) == pytest.approx(0.3)


def test_alone_a_prompt_is_one_chunk_up_to_the_cap(tiny_models):
    path = tiny_models["gqa"]
    pred = predictor(path)
    engine = local_engine(path, max_model_len=512, max_num_batched_tokens=CAP, predictor=pred,
                          tpot_s=chunk_s(pred, 16, 0, [8]) / STEP_SHARE)
    prompt = prompts_for(512, lengths=(300,), seed=6)[0]
    seq = engine.add(prompt, GREEDY)
    engine.step()
    assert seq.num_computed == 300 and seq.output_ids  # no stream to protect: the whole prompt in one step
    assert engine.step_budget.sized == 0


def test_tokens_equal_transformers_across_varying_chunks(tiny_models):
    """Learning on: the correction moves the target's chunk lengths step to step; greedy tokens never change."""
    path = tiny_models["gqa"]
    pred = predictor(path, learns=True)
    engine = local_engine(path, max_model_len=512, max_num_batched_tokens=CAP, predictor=pred,
                          tpot_s=chunk_s(pred, 40, 0, [RIDE_STEP] * 2) / STEP_SHARE)
    streams = prompts_for(512, lengths=(6, 9), seed=7)
    long = prompts_for(512, lengths=(230, 170), seed=8)
    seqs = [engine.add(p, GREEDY) for p in streams]
    engine.step()
    seqs += [engine.add(p, GREEDY) for p in long]
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in seqs] == [reference_greedy(path, p, 8) for p in streams + long]
    assert engine.blocks.num_used == 0


def test_a_learned_slowdown_shrinks_the_chunk(tiny_models):
    """Measured steps twice as slow as predicted: the corrected prediction sizes the chunk, so it shrinks and the
    target holds (the planner alone would keep breaking it)."""
    path = tiny_models["gqa"]
    pred = predictor(path, learns=True)
    decoding = [RIDE_STEP] * 2
    budget = StepBudget(pred, chunk_s(pred, 128, 0, decoding) / STEP_SHARE, block_size=16)
    before = budget.limit("auto", [], [], decoding, 0, 400, CAP, first=True)
    for n in (32, 64, 96, 128, 160, 192, 256):
        p = pred.plan("auto", [n], [0], decoding)
        for _ in range(8):
            pred.observe(p, 3 * p.raw_s)
    after = budget.limit("auto", [], [], decoding, 0, 400, CAP, first=True)
    assert before == 128 and 16 <= after < before / 2
    assert chunk_s(pred, after, 0, decoding) <= budget.target_s


def test_a_target_the_streams_alone_miss_still_reads_a_block_per_step(tiny_models):
    path = tiny_models["gqa"]
    pred = predictor(path)
    engine = local_engine(path, max_model_len=512, max_num_batched_tokens=CAP, predictor=pred, tpot_s=1e-6)
    chunks = chunks_of(engine, prompts_for(512, lengths=(50,), seed=9)[0], streams=2)
    assert [n for n, _, _ in chunks] == [16, 16, 16, 2]


def test_a_ttft_target_hurries_a_prompt_the_tpot_budget_would_starve(tiny_models):
    """A target the streams alone miss, with a TTFT deadline: the prompt's chunks read it by its deadline at one step
    per TPOT target (2 s at 0.5 s a step: 400 tokens in chunks of 112, 7 blocks), not one block a step, and all of it
    once the deadline is a step away or past; within the cap; greedy tokens unchanged. Without streams, the cap. The
    deadline is the TTFT target or twice the prompt's predicted lone prefill, whichever is later."""
    path = tiny_models["gqa"]
    pred = predictor(path)
    budget = StepBudget(pred, tpot_s=0.5, block_size=16, ttft_s=2.0)
    budget.target_s = 0.0  # the streams alone miss the target: one block, unless the deadline needs more
    assert budget.due_s(400) == 2.0 and budget.due_s(400) > SLOWDOWN * pred.prefill_s(512)
    assert budget.limit("auto", [], [], [8, 8], 0, 400, CAP, first=True, waited_s=0.0) == 112  # 400 in 4 steps
    assert budget.limit("auto", [], [], [8, 8], 0, 400, 64, first=True, waited_s=0.0) == 64  # within the cap
    assert budget.limit("auto", [], [], [8, 8], 0, 400, CAP, first=True, waited_s=1.2) == 400  # one step left
    assert budget.limit("auto", [], [], [8, 8], 0, 400, CAP, first=True, waited_s=None) == 16  # has its token
    assert budget.limit("auto", [], [], [], 0, 400, CAP, first=True, waited_s=0.0) == 400  # no stream: the cap
    slow = StepBudget(pred, tpot_s=0.5, block_size=16, ttft_s=1e-6)  # a target below any prefill: the slowdown bound
    assert slow.due_s(400) == pytest.approx(SLOWDOWN * pred.prefill_s(512))
    engine = local_engine(path, max_model_len=512, max_num_batched_tokens=CAP, predictor=pred, tpot_s=0.5,
                          ttft_s=1e-6)
    engine.step_budget.target_s = 0.0
    prompt = prompts_for(512, lengths=(50,), seed=9)[0]
    assert [n for n, _, _ in chunks_of(engine, prompt, streams=2)] == [50]  # due in ms, steps of 0.5 s: all of it
    seqs = [engine.add(p, GREEDY) for p in prompts_for(512, lengths=(6, 90), seed=10)]
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in seqs] == [reference_greedy(path, p, 8) for p in prompts_for(512, lengths=(6, 90),
                                                                                              seed=10)]


def test_the_deadline_floor_reads_the_rest_by_the_deadline():
    assert deadline_floor(400, 2.0, 0.5, 16) == 112  # 4 steps: 100 a step, in whole blocks
    assert deadline_floor(40, 2.0, 0.5, 16) == 16  # a block is plenty
    assert deadline_floor(400, 0.9, 0.5, 16) == 400  # within one step: the rest
    assert deadline_floor(400, -3.0, 0.5, 16) == 400  # late: the rest
    # the expected wait: hurried prompts are read by their deadline (each step at least a lone prefill of its chunk)
    def alone(tokens: int) -> float:
        return tokens * 0.001
    paced = paced_wait_s([(400, 1, None)], [100], 16, 0.5, alone)
    assert paced == pytest.approx(25 * 0.5)  # not hurried: 25 blocks, a step each
    hurried = paced_wait_s([(400, 1, 2.0)], [100], 16, 0.5, alone)
    assert hurried == pytest.approx(0.5 + 0.5 + 0.5 + 0.5)  # 112, 96, 96 and the last 96: four steps of 0.5 s
    late = paced_wait_s([(400, 1, -3.0)], [100], 16, 0.5, alone)
    assert late == pytest.approx(0.5)  # past its deadline: the rest in one step (a lone 400-token prefill is 0.4 s)
    # a second prompt's deadline counts from now: it waits for the first, then is hurried by what is left of its own
    assert paced_wait_s([(400, 1, 2.0), (400, 1, 2.5)], [100], 16, 0.5, alone) == pytest.approx(2.0 + 0.5)


def test_without_a_target_the_fixed_budget_is_unchanged(tiny_models):
    path = tiny_models["gqa"]
    engine = local_engine(path, max_model_len=512, max_num_batched_tokens=32, predictor=predictor(path))
    assert engine.step_budget is None
    assert [n for n, _, _ in chunks_of(engine, prompts_for(512, lengths=(100,), seed=4)[0], streams=2)] == \
        [30, 30, 30, 10]  # the cap less the two decode tokens


def test_config_step_budget_and_tpot_target():
    from pydantic import ValidationError

    from app.engine.build import EngineOptions
    from app.serve.config import PoolConfig

    slo = {"policy": "slo", "max_replicas": 1}
    pool = PoolConfig(name="p", autoscaling=slo, slo={"tpot_s": 0.3}, max_num_batched_tokens=1024)
    assert pool.tpot_s == 0.3 and pool.sized_tpot_s() == 0.3
    assert pool.engine_options("m", False).sized_tpot_s() == 0.3  # the engine gets the pool's target
    assert PoolConfig(name="p", autoscaling=slo, slo={"tpot_s": 0.3}, step_budget="fixed").sized_tpot_s() is None
    assert PoolConfig(name="p").sized_tpot_s() is None  # no target: the fixed budget
    assert PoolConfig(name="p", tpot_s=0.25).sized_tpot_s() == 0.25
    assert pool.ttft_s == 1.0 and pool.engine_options("m", False).ttft_s == 1.0  # slo.ttft_s's default: the deadline
    assert PoolConfig(name="p", tpot_s=0.25).ttft_s is None
    with pytest.raises(ValidationError, match="disagrees with slo.ttft_s"):
        PoolConfig(name="p", autoscaling=slo, slo={"ttft_s": 2.0}, ttft_s=1.0)
    with pytest.raises(ValidationError, match="disagrees with slo.tpot_s"):
        PoolConfig(name="p", autoscaling=slo, slo={"tpot_s": 0.3}, tpot_s=0.2)
    with pytest.raises(ValidationError, match="set tpot_s"):
        EngineOptions(step_budget="slo")
    with pytest.raises(ValidationError, match="enable_chunked_prefill"):
        PoolConfig(name="p", tpot_s=0.2, step_budget="slo", enable_chunked_prefill=False)
    with pytest.raises(ValidationError):
        PoolConfig(name="p", tpot_s=0)
