"""dynpart calibrate and dynpart bench: behaviour only (a profile the planner then uses, well-formed results);
the timings themselves are not asserted."""

from __future__ import annotations

import json

import pytest

from app.cli.main import main
from cost.fit import fit_alpha_beta


def _run(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_alpha_beta_fit_recovers_a_ring_collective():
    p, alpha, beta = 2, 50e-6, 2e9  # all-gather: p-1 steps, (p-1)/p of the full tensor sent per device
    samples = [{"bytes": b, "seconds": (p - 1) * alpha + (p - 1) / p * b / beta} for b in (1e4, 1e5, 1e6, 1e7)]
    fit = fit_alpha_beta("all_gather", p, samples)
    assert fit["latency_us"] == pytest.approx(50, rel=1e-6)
    assert fit["bandwidth_gbs"] == pytest.approx(2, rel=1e-6)


def test_calibrate_writes_a_profile_the_planner_uses(ray_session, tiny_models, tmp_path, monkeypatch, capsys):
    from cost import get_hardware, plan_prefill
    from strategies.loader import Checkpoint

    monkeypatch.setenv("DYNPART_PROFILE_DIR", str(tmp_path))
    out = _run(capsys, ["calibrate", "--model", tiny_models["gqa"], "--devices", "2", "--repeats", "1",
                        "--quiet-wait", "0", "--json"])
    assert out["path"] == str(tmp_path / "cpu.json")
    prof = out["profile"]
    assert prof["devices"] == 2 and [g["rows"] for g in prof["gemm"]] == sorted(g["rows"] for g in prof["gemm"])
    assert all(g["tflops"] > 0 for g in prof["gemm"]) and prof["attention"]
    assert set(prof["collectives"]) >= {"all_reduce", "all_gather"}
    hw = get_hardware("cpu")
    assert hw.calibrated_from == out["path"] and hw.gemm_curve and hw.attention_curve
    assert hw.alpha_beta("all_reduce") != get_hardware("cpu", use_profile=False).alpha_beta("all_reduce")
    choice = plan_prefill(Checkpoint(tiny_models["gqa"]).shape, hw, 2, 64)
    assert all(t is None or t > 0 for t in choice.predicted_s.values())


def test_bench_strategies_and_accuracy_are_well_formed(ray_session, chat_tiny, tmp_path, monkeypatch, capsys):
    from app.cli.bench import format_accuracy, format_strategies
    from cost import get_hardware, plan_prefill
    from strategies.layout import STRATEGY_NAMES
    from strategies.shapes import ModelShape

    monkeypatch.setenv("DYNPART_PROFILE_DIR", str(tmp_path))  # no profile: the catalog's cpu entry
    res = _run(capsys, ["bench", "strategies", "--model", chat_tiny, "--devices", "2", "--lengths", "8,32",
                        "--repeats", "1", "--no-handoff", "--quiet-wait", "0", "--json"])
    assert [r["tokens"] for r in res["rows"]] == [8, 32]
    for r in res["rows"]:
        assert set(r["median_s"]) == set(res["available"]) <= set(STRATEGY_NAMES)
        assert all(t > 0 for t in r["median_s"].values())
    ranks = res["memory"][0]["ranks"]
    assert len(ranks) == 2 and all(m["weights"] > 0 and m["rss"] > 0 for m in ranks)
    assert "| tokens" in format_strategies(res)

    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(res))
    acc = _run(capsys, ["bench", "accuracy", "--measured", str(measured), "--json"])
    assert [r["tokens"] for r in acc["rows"]] == [8, 32]
    shape, hw, errors = ModelShape(**res["shape"]), get_hardware("cpu"), []
    for r, m in zip(acc["rows"], res["rows"]):
        plan = plan_prefill(shape, hw, 2, r["tokens"], available=res["available"])
        assert r["measured_s"] == m["median_s"]  # the bench's own numbers, not re-measured
        assert r["predicted_s"] == pytest.approx({s: plan.predicted_s[s] for s in m["median_s"]})
        assert r["choice"] == plan.strategy and r["measured_best"] == min(m["median_s"], key=m["median_s"].get)
        assert r["regret"] == pytest.approx(m["median_s"][plan.strategy] / min(m["median_s"].values()) - 1)
        errors += [abs(plan.predicted_s[s] - t) / t for s, t in m["median_s"].items()]
    assert acc["mape"] == pytest.approx(sum(errors) / len(errors))
    assert acc["max_regret"] == pytest.approx(max(r["regret"] for r in acc["rows"]))
    assert "MAPE" in format_accuracy(acc)

    # scored again after an engine learned online from 12 served steps (prompts of other lengths), as a pool would
    learned = tmp_path / "learned.json"
    fixed = _run(capsys, ["bench", "accuracy", "--measured", str(measured), "--model", chat_tiny,
                          "--devices", "2", "--learn-steps", "12", "--learn-lengths", "12,20",
                          "--save-learned", str(learned), "--json"])
    assert fixed["mape"] == acc["mape"] and fixed["corrected"]["steps"] == 12  # the raw scores unchanged
    state = json.loads(learned.read_text())
    assert state["stamp"] and any(k.startswith("prefill|") for k in state["windows"])  # it ran prefills and learned
    assert [r["tokens"] for r in fixed["corrected"]["rows"]] == [8, 32]


def test_bench_engine_against_transformers_is_well_formed(chat_tiny, capsys):
    res = _run(capsys, ["bench", "engine", "--model", chat_tiny, "--lengths", "8,16", "--decode-tokens", "4",
                        "--decode-prompt", "8", "--repeats", "1", "--quiet-wait", "0", "--json"])
    assert [(r["kind"], r["tokens"]) for r in res["rows"]] == [("prefill", 8), ("prefill", 16), ("decode", 4)]
    assert all(r["dynpart_tok_s"] > 0 and r["transformers_tok_s"] > 0 and r["ratio"] > 0 for r in res["rows"])
