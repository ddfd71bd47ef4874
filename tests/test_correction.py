"""The online correction of the cost model (``cost.correction``), without Ray: it learns a bias, ignores an outlier,
falls back to coarser levels for unseen buckets, round-trips through its file, and re-ranks the planner's choice;
then once with the in-process engine, whose corrected predictions come closer to its measured steps."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from cost.correction import (Correction, CorrectionTable, StepKey, bucket, corrected_choice, correction_path,
                             correction_stamp)
from cost.hardware import get_hardware
from cost.planner import PlanChoice, plan_step
from strategies.shapes import ModelShape

A = StepKey.of("megatron", "prefill", 300, 0)


def test_buckets_are_log2():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 255, 256)] == [0, 1, 2, 2, 3, 8, 9]
    assert StepKey.of("x", "decode", 5, 100.5) == StepKey("x", "decode", 3, 7)


def test_converges_on_a_biased_stream():
    rng, c = random.Random(0), Correction()
    for _ in range(40):
        predicted = rng.uniform(0.01, 0.1)
        c.observe(A, predicted, 1.3 * predicted * rng.uniform(0.95, 1.05))
    assert c.factor(A) == pytest.approx(1.3, rel=0.03)
    assert c.correct(A, 0.2) == pytest.approx(0.26, rel=0.03)


def test_follows_a_change_of_speed_within_a_window():
    c = Correction()
    for _ in range(30):
        c.observe(A, 1.0, 1.2)
    for _ in range(12):
        c.observe(A, 1.0, 0.9)
    assert c.factor(A) == pytest.approx(0.9, rel=0.03)


def test_does_not_chase_one_outlier():
    c = Correction()
    for _ in range(20):
        c.observe(A, 0.05, 0.06)
    before = c.factor(A)
    c.observe(A, 0.05, 5.0)  # a step stalled 100x (a paused process, a GC)
    assert c.factor(A) == pytest.approx(before, rel=0.02)
    c.observe(A, 0.0, 1.0)  # no prediction: nothing to learn
    c.observe(A, 0.05, float("nan"))
    assert c.factor(A) == pytest.approx(before, rel=0.02)


def test_unseen_buckets_fall_back_to_coarser_levels():
    c = Correction()
    for _ in range(50):
        c.observe(StepKey.of("megatron", "prefill", 100, 0), 1.0, 2.0)
        c.observe(StepKey.of("megatron", "decode", 4, 200), 1.0, 0.5)
    for _ in range(50):
        c.observe(StepKey.of("weight_gathered", "prefill", 2000, 0), 1.0, 3.0)
    assert c.factor(StepKey.of("megatron", "prefill", 100, 0)) == pytest.approx(2.0, rel=0.1)
    # the same layout and kind, another length: the layout's factor
    assert c.factor(StepKey.of("megatron", "prefill", 5000, 64)) == pytest.approx(2.0, rel=0.1)
    assert c.factor(StepKey.of("weight_gathered", "prefill", 9, 0)) == pytest.approx(3.0, rel=0.1)
    # a layout never run: prefill steps in general (between 2 and 3)
    assert 2.0 <= c.factor(StepKey.of("projection_replicated", "prefill", 100, 0)) <= 3.0
    assert c.factor(StepKey.of("megatron", "decode", 64, 1000)) == pytest.approx(0.5, rel=0.1)
    assert Correction().factor(A) == 1.0  # nothing learned: the planner's figure


def test_a_key_of_its_own_takes_over_as_its_evidence_grows():
    c = Correction()
    for _ in range(200):
        c.observe(StepKey.of("megatron", "prefill", 100, 0), 1.0, 2.0)
    own = StepKey.of("megatron", "prefill", 3000, 0)
    c.observe(own, 1.0, 1.0)
    one = c.factor(own)
    assert 1.0 < one < 2.0  # one step of its own: mostly the layout's 2x still
    for _ in range(40):  # the other length keeps running at 2x meanwhile
        c.observe(own, 1.0, 1.0)
        c.observe(StepKey.of("megatron", "prefill", 100, 0), 1.0, 2.0)
    assert 1.0 < c.factor(own) < one  # shrunk toward the layout's figure, less so with more steps
    assert c.factor(own) == pytest.approx(1.0, rel=0.05)
    assert c.factor(StepKey.of("megatron", "prefill", 100, 0)) == pytest.approx(2.0, rel=0.05)


def test_persisted_and_reloaded_equal(tmp_path):
    c = Correction(stamp="s1")
    rng = random.Random(1)
    for i in range(100):
        key = StepKey.of(["megatron", "weight_gathered"][i % 2], ["prefill", "decode"][i % 3 == 0], 2 ** (i % 9), i)
        c.observe(key, 0.01, 0.01 * rng.uniform(0.8, 1.6))
    path = tmp_path / "corrections" / "c.json"
    c.save(path)
    back = Correction.load(path, "s1")
    assert back.table() == c.table()
    assert back.state() == c.state()
    assert Correction.load(path, "another calibration").table().entries == {}
    assert Correction.load(tmp_path / "missing.json", "s1").table().entries == {}
    path.write_text("{not json")
    assert Correction.load(path, "s1").table().entries == {}


def test_merge_weighs_replicas_by_their_steps():
    a = CorrectionTable(entries={"": (math.log(2.0), 30)})
    b = CorrectionTable(entries={"": (0.0, 10), "decode": (0.1, 5)})
    m = CorrectionTable.merge([a, b])
    assert m.entries[""][1] == 40 and m.entries[""][0] == pytest.approx(0.75 * math.log(2.0))
    assert m.entries["decode"] == (0.1, 5)
    assert CorrectionTable.merge([]).entries == {}


def test_corrected_choice_ranks_by_the_corrected_times():
    choice = PlanChoice(strategy="megatron", tokens=1000, predicted_s={"megatron": 1.0, "weight_gathered": 1.1,
                                                                       "projection_replicated": None},
                        reasons={"projection_replicated": "needs memory"})
    assert corrected_choice(choice, CorrectionTable(), "prefill", 1000, 0) is choice
    c = Correction()
    for _ in range(20):
        c.observe(StepKey.of("megatron", "prefill", 1000, 0), 1.0, 1.5)
        c.observe(StepKey.of("weight_gathered", "prefill", 1000, 0), 1.0, 1.0)
    better = corrected_choice(choice, c.table(), "prefill", 1000, 0)
    assert better.strategy == "weight_gathered"
    assert better.predicted_s["megatron"] > 1.3 and better.predicted_s["projection_replicated"] is None


def test_stamp_and_path_follow_hardware_model_and_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNPART_PROFILE_DIR", str(tmp_path))
    cpu = get_hardware("cpu")
    stamp = correction_stamp(cpu, "m", 2)
    assert stamp == correction_stamp(cpu, "m", 2) != correction_stamp(cpu, "m", 4)
    assert stamp != correction_stamp(cpu.time_shared(0.5), "m", 2)  # another core share: other raw predictions
    assert correction_path(cpu, "smollm2 135m", 2) == tmp_path / "corrections" / "cpu-smollm2_135m-p2.json"


SHAPE = ModelShape(name="t", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                   num_kv_heads=4, head_dim=32, max_position_embeddings=4096)


def test_step_predictor_plans_as_the_planner_until_it_has_learned():
    from app.engine.predictor import StepPredictor

    cpu = get_hardware("L4")  # a GPU pair: every named strategy wins somewhere
    layouts = ["megatron", "weight_gathered", "projection_replicated"]
    pred = StepPredictor(SHAPE, cpu, 2, layouts)
    for new, cached, decoding in [([40], [0], []), ([1500], [0], [30, 40]), ([3000], [500], [])]:
        want = plan_step(SHAPE, cpu, 2, new, cached, decoding, available=layouts)
        got = pred.plan("auto", new, cached, decoding)
        assert got.strategy == want.strategy and got.raw_s == got.corrected_s == want.time_s
    decode = pred.plan(None, [], [], [100, 200])
    assert decode.strategy == "megatron" and decode.key.kind == "decode" and decode.raw_s > 0
    pinned = pred.plan("weight_gathered", [40], [0], [])
    assert pinned.strategy == "weight_gathered"
    for _ in range(10):  # megatron turns out 3x slower than priced on long prompts: the pick moves
        pred.observe(pred.plan("megatron", [3000], [500], []), 3 * pred.plan("megatron", [3000], [500], []).raw_s)
    moved = pred.plan("auto", [3000], [500], [])
    assert moved.corrected_s == pytest.approx(moved.raw_s * pred.table().factor(moved.key))
    assert pred.plan("megatron", [3000], [500], []).corrected_s == pytest.approx(
        3 * pred.plan("megatron", [3000], [500], []).raw_s, rel=0.05)
    errors = pred.drain_errors()
    assert set(errors) == {"megatron"} and errors["megatron"] > 0 and pred.drain_errors() == {}


def test_engine_corrected_predictions_come_closer_to_its_measured_steps(tiny_models):
    from app.engine.predictor import StepPredictor
    from app.engine.params import SamplingParams
    from strategies.loader import Checkpoint
    from tests.conftest import local_engine

    path = tiny_models["gqa"]
    pred = StepPredictor(Checkpoint(path).shape, get_hardware("cpu"), 1, ["megatron"])
    seen: list[tuple[float, float, float]] = []  # (planner's, corrected, measured) per step
    observe = pred.observe
    pred.observe = lambda p, took: (seen.append((p.raw_s, p.corrected_s, took)), observe(p, took))[1]
    engine = local_engine(path, predictor=pred)
    engine.generate([[5] * 12, [7] * 20], SamplingParams(max_tokens=48, ignore_eos=True))
    assert len(seen) >= 40
    late = seen[-10:]  # each predicted before its step, from the steps before it
    raw_err = statistics.median(abs(math.log(m / r)) for r, _, m in late)
    corrected_err = statistics.median(abs(math.log(m / c)) for _, c, m in late)
    # the uncalibrated catalog's CPU misses a tiny model's steps (Python dispatch) many times over; the correction
    # learns it; what remains is this shared machine's noise
    assert corrected_err < raw_err / 2


def test_held_out_scoring_scores_the_corrected_predictions_too(tmp_path, monkeypatch, capsys):
    """``dynpart bench accuracy --correction FILE``: a measurement 2x the uncorrected model, a table that learned 2x:
    the plain predictions miss by half, the corrected ones by nothing, both printed."""
    import json

    from app.cli.main import main
    from cost.planner import plan_prefill as prefill
    from load_tests.engine_runs import accuracy
    from strategies.shapes import model_shape

    monkeypatch.setenv("DYNPART_PROFILE_DIR", str(tmp_path))
    shape, cpu, named = model_shape("smollm2-135m"), get_hardware("cpu"), ["megatron", "projection_replicated"]
    rows = [{"tokens": n, "median_s": {s: 2 * prefill(shape, cpu, 2, n, available=named).predicted_s[s]
                                       for s in named}} for n in (40, 700)]
    measured = {"shape": shape.model_dump(), "devices": 2, "available": named, "rows": rows}
    c = Correction()
    for n in (40, 700):
        for s in named:
            for _ in range(8):
                c.observe(StepKey.of(s, "prefill", n, 0), 1.0, 2.0)
    res = accuracy(measured, cpu, c.table())
    assert res["mape"] == pytest.approx(0.5) and res["corrected"]["mape"] < 0.01
    assert res["corrected"]["steps"] == 32 and res["corrected"]["max_regret"] == res["max_regret"]
    (tmp_path / "m.json").write_text(json.dumps(measured))
    c.save(tmp_path / "c.json")
    assert main(["bench", "accuracy", "--measured", str(tmp_path / "m.json"), "--correction",
                 str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "MAPE 50.0%" in out and "32 steps learned" in out and "MAPE 0.1%" in out


def test_a_bucket_between_two_learned_ones_takes_their_interpolation():
    """The bias changes with the step's size: a token bucket never run, between two that were, is corrected by their
    interpolation (in log2 tokens), not by the layout's figure that mixes every size; outside them, the layout's."""
    c = Correction()
    for _ in range(30):
        c.observe(StepKey.of("megatron", "prefill", 60, 0), 1.0, 0.8)  # bucket 6
        c.observe(StepKey.of("megatron", "prefill", 1000, 0), 1.0, 0.5)  # bucket 10
    mid = c.factor(StepKey.of("megatron", "prefill", 200, 0))  # bucket 8: halfway in log2 tokens
    assert mid == pytest.approx(math.exp((math.log(0.8) + math.log(0.5)) / 2), rel=0.03)
    near_low = c.factor(StepKey.of("megatron", "prefill", 100, 0))  # bucket 7: a quarter of the way
    assert mid < near_low < 0.8
    beyond = c.factor(StepKey.of("megatron", "prefill", 3000, 0))  # past the last learned bucket: the layout's
    assert beyond == pytest.approx(c.factor(StepKey.of("megatron", "prefill", 9000, 0)))
    assert c.factor(StepKey.of("megatron", "prefill", 200, 64)) == pytest.approx(beyond)  # another cached bucket


def test_a_layout_never_run_borrows_the_size_profile_of_those_that_ran():
    """The engine learns only the layouts it chooses; one it never ran is corrected, size by size, as those that ran
    are (their steps weigh), not by the kind's single figure that mixes every size."""
    c = Correction()
    for _ in range(30):
        c.observe(StepKey.of("megatron", "prefill", 60, 0), 1.0, 0.8)
        c.observe(StepKey.of("megatron", "prefill", 1000, 0), 1.0, 0.5)
    for tokens in (60, 200, 1000):
        assert c.factor(StepKey.of("weight_gathered", "prefill", tokens, 0)) == pytest.approx(
            c.factor(StepKey.of("megatron", "prefill", tokens, 0)))
    assert c.factor(StepKey.of("weight_gathered", "prefill", 60, 0)) == pytest.approx(0.8, rel=0.05)
    # no decode step ran: nothing to borrow, every layout takes the global figure
    assert c.factor(StepKey.of("weight_gathered", "decode", 1, 60)) == c.factor(StepKey.of("megatron", "decode", 1, 60))
