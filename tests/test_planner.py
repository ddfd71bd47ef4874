"""Pareto search, planner choices and the CLI's user-facing behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.cli.main import main
from cost import get_hardware, plan, plan_decode, plan_prefill, plan_step, search
from cost.formulas import Collective, Work, collective_time
from cost.layouts import model_time
from cost.planner import DEFAULT_UTILIZATION, memory_row
from cost.report import plot_plan
from cost.search import STRATEGIES, pareto_indices
from strategies.shapes import CATALOG

L4, A100 = get_hardware("L4"), get_hardware("A100-80GB-SXM")
LLAMA7, LLAMA13, LLAMA70 = CATALOG["llama2-7b"], CATALOG["llama2-13b"], CATALOG["llama2-70b"]


def prefix_gather_s(cached: int, p: int) -> float:
    """One layer's all-gather of a cached prefix's K/V (every head) on p L4s."""
    size = cached * LLAMA7.kv_bytes_per_token(L4.bytes_per_element) / LLAMA7.num_layers
    return collective_time(Collective("prefix", "all_gather", size), L4, p)


@pytest.fixture(scope="module")
def front_7b_l4():
    return search(LLAMA7, L4, 4)


def test_pareto_drops_dominated_rows_and_keeps_ties():
    v = np.array([[1, 1], [2, 2], [1, 2], [1, 1], [0, 3]])
    assert pareto_indices(v) == [0, 3, 4]


def test_front_members_do_not_dominate_each_other(front_7b_l4):
    vec = [[c.flops for c in m.costs] + [c.activation_bytes for c in m.costs]
           + [m.costs[0].weight_bytes, m.costs[0].latency_steps, m.costs[0].memory_bytes] for m in front_7b_l4.front]
    arr = np.array(vec)
    assert sorted(pareto_indices(arr)) == list(range(len(vec)))
    assert front_7b_l4.candidates > 10 * len(front_7b_l4.front)  # most candidates are dominated and dropped


def test_each_engine_strategy_is_on_the_front_in_a_realistic_setting(front_7b_l4):
    names = {m.strategy for m in front_7b_l4.front}
    assert {"megatron", "projection_replicated"} <= names  # 7B on 4×L4 (PCIe)
    gqa = search(LLAMA70, A100, 4)  # 70B (GQA: K/V gathers are small) on 4×A100 NVLink
    assert "weight_gathered" in {m.strategy for m in gqa.front}
    # where a strategy is not on the front, the search names what beats it
    for name, by in front_7b_l4.dominated_strategies.items():
        assert name not in names and by in {m.label for m in front_7b_l4.front}


def test_planner_picks_megatron_for_decode():
    for hw in (L4, A100):
        for batch in (1, 16):
            assert plan_decode(LLAMA7, hw, 4, [1024] * batch).strategy == "megatron"


def test_prefill_choice_is_the_fastest_available_and_reports_every_strategy():
    short, long = plan_prefill(LLAMA7, L4, 4, 64), plan_prefill(LLAMA7, L4, 4, 4000)
    for ch in (short, long):
        assert set(ch.predicted_s) == {"megatron", "weight_gathered", "projection_replicated"}
        assert ch.time_s == min(t for t in ch.predicted_s.values() if t is not None)
    assert short.strategy == "megatron" and long.strategy != "megatron"  # PCIe: long prompts leave megatron
    only = plan_prefill(LLAMA7, L4, 4, 4000, available=["megatron"])
    assert only.strategy == "megatron" and "projection_replicated" in only.reasons
    batch = plan_prefill(LLAMA7, L4, 4, [1000, 1000])
    assert batch.tokens == 2000
    with pytest.raises(ValueError, match="unknown prefill strategy .pipeline."):
        plan_prefill(LLAMA7, L4, 4, 64, available=["pipeline"])


def test_nothing_cached_plans_exactly_as_a_whole_prompt():
    for tokens in (64, 4000, [1000, 1000]):
        old = plan_prefill(LLAMA7, L4, 4, tokens)
        assert plan_prefill(LLAMA7, L4, 4, tokens, None, DEFAULT_UTILIZATION, 0) == old
        zeros = [0] * len(tokens) if isinstance(tokens, list) else 0
        assert plan_prefill(LLAMA7, L4, 4, tokens, cached=zeros) == old
    n = 4000  # what the four-field Work (no cached prefix) predicts
    legacy = Work(n, n * (n + 1) // 2, n, 1)
    for name, t in plan_prefill(LLAMA7, L4, 4, n).predicted_s.items():
        assert t == model_time(STRATEGIES[name], LLAMA7, L4, 4, legacy)


def test_cached_prefix_costs_token_sharding_at_least_its_gather_per_layer():
    new, cached, p = 1024, 2048, 4
    plain, chunk = plan_prefill(LLAMA7, L4, p, new), plan_prefill(LLAMA7, L4, p, new, cached=cached)
    gather = prefix_gather_s(cached, p)
    grown = {n: chunk.predicted_s[n] - plain.predicted_s[n] for n in STRATEGIES}
    for name in ("weight_gathered", "projection_replicated"):
        assert grown[name] >= LLAMA7.num_layers * gather
    assert 0 < grown["megatron"] < LLAMA7.num_layers * gather  # reads the cached keys, gathers nothing
    # the prefix's K/V must be resident, as if it had been prefilled with the chunk
    for name in STRATEGIES:
        kv = memory_row(name, LLAMA7, L4, p, Work.chunks(new, cached)).kv_gb
        assert kv == pytest.approx(memory_row(name, LLAMA7, L4, p, Work.prefill(new + cached)).kv_gb)


def test_long_cached_prefix_can_send_a_chunk_back_to_megatron():
    top = LLAMA7.max_position_embeddings
    flips = []
    for new in (512, 1024, 1536, 2048, 3072):
        sharded = plan_prefill(LLAMA7, L4, 4, new).strategy
        if sharded == "megatron":
            continue
        for cached in range(256, top - new + 1, 256):
            if plan_prefill(LLAMA7, L4, 4, new, cached=cached).strategy == "megatron":
                flips.append((new, cached, sharded))
                break
    assert flips, "7B on 4×L4 (PCIe): a long enough prefix should make some chunk cheaper under megatron"
    new, cached, sharded = flips[0]
    chunk = plan_prefill(LLAMA7, L4, 4, new, cached=cached)
    gather = prefix_gather_s(cached, 4)
    # it is the prefix gather that flips it: without it the token-sharded strategy would still be faster
    assert chunk.predicted_s[sharded] - LLAMA7.num_layers * gather < chunk.predicted_s["megatron"]
    # the same prefix does not flip a chunk long enough that attention dominates
    assert any(plan_prefill(LLAMA7, L4, 4, n, cached=cached).strategy != "megatron" for n in (2048, 3072)
               if n + cached <= top)


def test_replication_is_refused_when_it_does_not_fit():
    ch = plan_prefill(LLAMA13, L4, 4, 2048)  # 26 GB of replicated weights on 24 GB cards
    assert ch.predicted_s["projection_replicated"] is None
    assert "GB" in ch.reasons["projection_replicated"] and ch.strategy != "projection_replicated"


def test_plan_crossovers_are_where_the_choice_changes():
    rep = plan(LLAMA7, L4, 4)
    assert rep.crossovers, "7B on 4×L4 should change strategy within its context"
    for c in rep.crossovers:
        assert plan_prefill(LLAMA7, L4, 4, c.tokens - 1).strategy == c.before
        assert plan_prefill(LLAMA7, L4, 4, c.tokens).strategy == c.after
    assert [r.tokens for r in rep.lengths][-1] == LLAMA7.max_position_embeddings
    assert all(m.feasible for m in rep.memory)
    assert rep.decode and all(d.choice == "megatron" for d in rep.decode)
    assert not any(m.feasible for m in plan(LLAMA13, L4, 4).memory if m.strategy == "projection_replicated")


def test_faster_links_move_megatron_crossover_later():
    def first_switch(hw):
        return (plan(LLAMA7, hw, 4).crossovers or [None])[0]

    slow_link = L4.model_copy(update={"link": L4.link.model_copy(update={"bandwidth_gbs": 5})})
    fast_link = L4.model_copy(update={"link": L4.link.model_copy(update={"bandwidth_gbs": 100})})
    slow, fast = first_switch(slow_link), first_switch(fast_link)
    assert slow is not None and (fast is None or fast.tokens > slow.tokens)


def test_plot_file_is_written(tmp_path):
    out = tmp_path / "plan.png"
    plot_plan(plan(LLAMA7, L4, 2, lengths=[64, 512, 4096]), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_every_front_member_the_planner_offers(tmp_path):
    """``dynpart plan --plot`` (front, the default): a line per layout the engine offers, not only the named three."""
    from cost.planner import executable_layouts
    from strategies.layout import parse_layout

    offered = executable_layouts(LLAMA7, L4, 4)
    assert len(offered) > len(STRATEGIES)
    fig = plot_plan(plan(LLAMA7, L4, 4, lengths=[64, 512, 4096], available=offered), str(tmp_path / "plan.png"))
    drawn = {line.get_label() for line in fig.axes[0].get_lines()}
    assert {parse_layout(name).name for name in offered} <= drawn


def test_cli_search_says_every_row_runs(capsys):
    assert main(["search", "--model", "llama2-7b", "--gpu", "L4", "--devices", "4"]) == 0
    out = capsys.readouterr().out
    assert "not implemented" not in out and "Every row runs" in out


def test_cli_plan_json_and_plot(tmp_path, capsys):
    out = tmp_path / "p.png"
    assert main(["plan", "--model", "llama2-7b", "--gpu", "A100-40GB-SXM", "--devices", "4", "--json",
                 "--lengths", "128,4096", "--plot", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["tokens"] for r in rep["lengths"]] == [128, 4096] and out.exists()


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "llama9", "--gpu", "L4", "--devices", "2"], "unknown model"),
    (["plan", "--model", "llama2-7b", "--gpu", "L9", "--devices", "2"], "unknown hardware"),
    (["search", "--model", "llama2-7b", "--gpu", "L4", "--devices", "33"], "cannot be split over 33"),
    (["plan", "--model", "llama2-7b", "--gpu", "L4", "--devices", "0"], "at least 1"),
    (["simulate", "--model", "llama2-7b", "--pool", "L4:x", "--workload", "mixture"], "GPU:P"),
])
def test_cli_bad_input_is_a_clean_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_step_prices_the_decode_pass_that_a_non_megatron_chunk_adds():
    """Decode tokens in a step run megatron: merged into a megatron chunk's pass, or in a second pass after a
    token-sharded chunk. The step's choice weighs that second pass, so enough decoding sequences turn a chunk the
    planner gives to a token-sharded strategy alone over to megatron."""
    from cost import decode_step_time, plan_step

    alone = plan_prefill(LLAMA7, L4, 4, [1024])
    assert alone.strategy != "megatron"
    assert plan_step(LLAMA7, L4, 4, [1024], [0], []).strategy == alone.strategy
    flipped = None
    for seqs in (1, 4, 16, 64, 256):
        step = plan_step(LLAMA7, L4, 4, [1024], [0], [2048] * seqs)
        extra = decode_step_time(LLAMA7, L4, 4, [2048] * seqs)
        assert step.predicted_s[alone.strategy] == pytest.approx(alone.predicted_s[alone.strategy] + extra)
        merged = plan_prefill(LLAMA7, L4, 4, [1024] + [1] * seqs, cached=[0] + [2048] * seqs)
        assert step.predicted_s["megatron"] == pytest.approx(merged.predicted_s["megatron"])
        if step.strategy == "megatron":
            flipped = seqs
            break
    assert flipped is not None, "no decode load made the merged megatron pass cheaper"


def test_the_planner_picks_from_the_whole_executable_front(capsys, tmp_path, monkeypatch):
    """13B on 4×L4: the front's partially replicated layouts fit where projection_replicated does not, and the planner
    takes one of them for long prompts; ``dynpart plan`` names it; the engine's contenders contain every choice."""
    from cost.planner import contenders, executable_layouts

    monkeypatch.setenv("DYNPART_CACHE", str(tmp_path))
    front = executable_layouts(LLAMA13, L4, 4)
    assert len(front) > 20 and set(STRATEGIES) <= set(front)
    for n in (64, 2048, 4000):
        ch = plan_prefill(LLAMA13, L4, 4, n, available=front)
        assert set(front) <= set(ch.predicted_s)
        ok = [t for s, t in ch.predicted_s.items() if t is not None and s not in ch.reasons]
        assert ch.time_s == min(ok)
    long = plan_prefill(LLAMA13, L4, 4, 2048, available=front)
    named = plan_prefill(LLAMA13, L4, 4, 2048)
    assert long.strategy not in STRATEGIES and long.time_s < named.time_s  # beyond the three, and faster
    assert named.predicted_s["projection_replicated"] is None  # the full replicas do not fit a 24 GB L4
    picks = contenders(LLAMA13, L4, 4, front, 4096)
    assert long.strategy in picks and "megatron" in picks and len(picks) < len(front)
    assert main(["plan", "--model", "llama2-13b", "--gpu", "L4", "--devices", "4", "--lengths", "2048"]) == 0
    assert long.strategy in capsys.readouterr().out


def test_layouts_closer_than_the_calibrations_noise_are_ties():
    """A profile's ``spread`` (its repeated measurements' own noise) makes layouts predicted closer than it ties:
    megatron wins them, then fewer collectives per layer, then less memory; the fastest wins outside it."""
    from cost.planner import best_of, collectives_per_layer

    shape, l4 = CATALOG["llama2-7b"], get_hardware("L4")
    assert plan_prefill(shape, l4, 2, 1024).strategy == "projection_replicated"  # 10% faster than megatron
    assert plan_prefill(shape, l4.model_copy(update={"prediction_spread": 0.05}), 2, 1024).strategy == \
        "projection_replicated"
    noisy = l4.model_copy(update={"prediction_spread": 0.15})
    assert plan_prefill(shape, noisy, 2, 1024).strategy == "megatron"
    assert plan_step(shape, noisy, 2, [1024], [0], [100]).strategy == "megatron"
    tied = plan_prefill(shape, l4.model_copy(update={"prediction_spread": 0.05}), 2, 3000)
    assert tied.predicted_s["weight_gathered"] < tied.predicted_s["megatron"]
    work = Work.prefill(3000)
    assert (collectives_per_layer("projection_replicated", shape, 2, work, 2)
            < collectives_per_layer("weight_gathered", shape, 2, work, 2))
    assert tied.strategy == "projection_replicated"
    times = {"a": 1.0, "b": 1.02, "c": 1.5}
    assert best_of(times) == "a"
    assert best_of(times, 0.05, {"a": (4, 1.0), "b": (2, 3.0), "c": (0, 0.0)}) == "b"  # fewer collectives
    assert best_of(times, 0.05, {"a": (2, 1.0), "b": (2, 0.5), "c": (0, 0.0)}) == "b"  # then less memory
