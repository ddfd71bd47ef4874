"""Simulator sanity: load, feasibility, SLOs, traces, and its consistency with the planner.

The simulator replays the planner's own predictions, so ``dynamic`` beating every static policy in it is consistency
(the planner picks the minimum of what the simulator charges), not evidence of a gain: that comes from measuring
real engines (``load_tests.compare``, BENCHMARKS.md).
"""

from __future__ import annotations

import pytest

from app.cli.main import main
from cost import get_hardware
from cost.simulator import POLICIES, SLO, Pool, run_policy, simulate
from cost.workloads import Request, builtin_workload, load_trace
from strategies.shapes import CATALOG

LLAMA7, LLAMA13 = CATALOG["llama2-7b"], CATALOG["llama2-13b"]
L4_POOL = [Pool(hardware=get_hardware("L4"), devices=4)]


def _requests(rate: float, n: int = 40) -> list[Request]:
    """Short outputs keep the replay cheap; prompts alternate short and long."""
    return [Request(arrival_s=i / rate, prompt_tokens=(200 if i % 2 else 3000), output_tokens=8) for i in range(n)]


def test_every_request_completes_and_times_are_consistent():
    res = run_policy(LLAMA7, L4_POOL, _requests(2.0), "static:megatron")
    assert res.completed == 40 and res.rejected == 0
    assert all(0 < r.ttft_s <= r.e2e_s for r in res.records)
    assert sum(res.strategies.values()) >= 1 and set(res.strategies) == {"megatron"}
    assert res.ttft_s.p50 <= res.ttft_s.p90 <= res.ttft_s.p99


def test_more_load_means_higher_ttft():
    light = run_policy(LLAMA7, L4_POOL, _requests(0.5), "static:megatron")
    heavy = run_policy(LLAMA7, L4_POOL, _requests(50.0), "static:megatron")
    assert heavy.ttft_s.p90 > 2 * light.ttft_s.p90
    more_replicas = [Pool(hardware=get_hardware("L4"), devices=4, replicas=3)]
    spread = run_policy(LLAMA7, more_replicas, _requests(50.0), "static:megatron")
    assert spread.ttft_s.p90 < heavy.ttft_s.p90


def test_dynamic_is_consistent_with_the_predictions_it_replays():
    """Uncongested, each request's dynamic TTFT is the least of the static ones: a check that the planner and the
    simulator charge the same costs, not that dynamic is faster on real hardware."""
    reqs = builtin_workload("length-sweep")
    for hw in ("L4", "A100-40GB-SXM"):
        rep = simulate(LLAMA7, [Pool(hardware=get_hardware(hw), devices=4)], reqs)
        by = {p.policy: {r.prompt_tokens: r.ttft_s for r in p.records} for p in rep.policies if p.runnable}
        for n in by["dynamic"]:
            best = min(by[p][n] for p in by if p.startswith("static"))
            assert by["dynamic"][n] <= best * (1 + 1e-9)
            assert by["dynamic:front"][n] <= by["dynamic"][n] * (1 + 1e-9)  # the front holds the named layouts


def test_a_static_policy_that_does_not_fit_is_reported_not_run():
    rep = simulate(LLAMA13, L4_POOL, _requests(1.0, 6))
    pr = next(p for p in rep.policies if p.policy == "static:projection_replicated")
    assert not pr.runnable and "does not fit" in pr.reason
    dyn = next(p for p in rep.policies if p.policy == "dynamic")
    assert dyn.runnable and "projection_replicated" not in dyn.strategies


def test_replicas_cost_kv_room():
    rep = simulate(LLAMA7, L4_POOL, _requests(1.0, 4))
    kv = {p.policy: sum(p.kv_capacity_tokens.values()) for p in rep.policies}
    assert kv["static:projection_replicated"] < kv["static:weight_gathered"] < kv["static:megatron"]


def test_slo_and_goodput():
    strict = run_policy(LLAMA7, L4_POOL, _requests(2.0), "dynamic", slo=SLO(ttft_s=1e-6, tpot_s=1e-6))
    loose = run_policy(LLAMA7, L4_POOL, _requests(2.0), "dynamic", slo=SLO(ttft_s=100, tpot_s=100))
    assert strict.slo_attainment == 0 and strict.goodput_rps == 0
    assert loose.slo_attainment == 1 and loose.goodput_rps > 0


def test_builtin_workloads_are_seeded_and_respect_the_context():
    a, b = builtin_workload("mixture", 50, seed=1), builtin_workload("mixture", 50, seed=1)
    assert a == b and all(r.prompt_tokens + r.output_tokens <= 4096 for r in a)
    chat, docs = builtin_workload("short-chat", 200), builtin_workload("long-document", 200)
    assert sorted(r.prompt_tokens for r in chat)[100] < sorted(r.prompt_tokens for r in docs)[100]
    with pytest.raises(ValueError, match="unknown workload"):
        builtin_workload("nope")


def test_csv_trace_and_rate_rescaling(tmp_path):
    f = tmp_path / "trace.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,4\n10,2000,4\n20,50,4\n")
    reqs = load_trace(f)
    assert [r.prompt_tokens for r in reqs] == [100, 2000, 50]
    assert load_trace(f, rate=1.0)[-1].arrival_s == pytest.approx(2.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("when,len\n1,2\n")
    with pytest.raises(ValueError, match="arrival_s,prompt_tokens,output_tokens"):
        load_trace(bad)


def test_cli_simulate_prints_every_policy(tmp_path, capsys):
    f = tmp_path / "trace.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,4\n1,3000,4\n")
    assert main(["simulate", "--model", "llama2-7b", "--pool", "L4:4", "--pool", "A100-40GB-SXM:4:2",
                 "--workload", str(f)]) == 0
    out = capsys.readouterr().out
    assert all(p in out for p in POLICIES) and "dynamic:front against each other policy" in out
