"""The repeated-run aggregation of ``load_tests.compare``, on summaries made by hand (no Ray, no server)."""

from __future__ import annotations

from load_tests.compare import BASELINE, ratio_table, rotated, run_label, spread_table
from load_tests.metrics import Stat, Summary

OTHER = "dynamic"


def stat(ms: float) -> Stat:
    return Stat(mean=ms, p50=ms, p90=1.5 * ms, p99=2 * ms, n=10)


def summary(ms: float, rps: float, goodput: float | None = None) -> Summary:
    """A run whose latencies are all ``ms``-based and whose throughput is ``rps``."""
    return Summary(completed=10, failed=0, errors={}, duration_s=10 / rps, request_throughput=rps,
                   output_throughput=20 * rps, goodput=goodput, ttft_ms=stat(ms), tpot_ms=stat(ms / 10),
                   itl_ms=stat(ms / 10), e2e_ms=stat(4 * ms))


def row(table: str, metric: str) -> list[str]:
    """The cells of one metric's row, without the metric's label."""
    line = next(x for x in table.splitlines() if x.startswith(f"| {metric} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_consistently_slower_policy_gets_ratio_about_two_and_a_mark():
    rounds = [{BASELINE: summary(100, 2.0), OTHER: summary(200, 1.0)},
              {BASELINE: summary(120, 1.8), OTHER: summary(246, 0.9)},
              {BASELINE: summary(90, 2.2), OTHER: summary(171, 1.1)}]
    table = spread_table(rounds)
    base, other = row(table, "TTFT p50")
    assert base == "100"  # median over rounds, no ratio for the baseline itself
    assert other == "200 (2.00x [1.90–2.05]) ✓"
    assert row(table, "E2E p90")[1].endswith("x [1.90–2.05]) ✓")
    assert row(table, "req/s")[1] == "1 (0.50x [0.50–0.50]) ✓"  # below 1 in every round is a claim too
    assert row(table, "goodput") == ["-", "-"]  # not measured in any round


def test_ratios_straddling_one_get_no_mark():
    rounds = [{BASELINE: summary(100, 2.0), OTHER: summary(90, 2.0)},
              {BASELINE: summary(100, 2.0), OTHER: summary(110, 2.0)}]
    table = spread_table(rounds)
    assert row(table, "TTFT p50")[1] == "100 (1.00x [0.90–1.10])"
    assert "✓" not in row(table, "TPOT p50")[1]
    assert row(table, "req/s")[1] == "2 (1.00x [1.00–1.00])"  # equal to 1 is not a side of 1


def test_metric_missing_in_a_round_is_skipped_for_that_round():
    rounds = [{BASELINE: summary(100, 2.0, goodput=1.0), OTHER: summary(200, 1.0, goodput=0.5)},
              {BASELINE: summary(100, 2.0, goodput=None), OTHER: summary(200, 1.0, goodput=0.4)},
              {BASELINE: summary(100, 2.0, goodput=1.0), OTHER: summary(200, 1.0, goodput=0.6)}]
    base, other = row(spread_table(rounds), "goodput")
    assert base == "1"
    assert other == "0.5 (0.55x [0.50–0.60]) ✓"  # values from all three rounds, ratios from rounds 0 and 2


def test_single_round_is_no_evidence_of_a_difference():
    table = spread_table([{BASELINE: summary(100, 2.0), OTHER: summary(200, 1.0)}])
    assert row(table, "TTFT p50")[1] == "200 (2.00x [2.00–2.00])"


def test_columns_keep_the_given_order():
    rounds = [{BASELINE: summary(100, 2.0), OTHER: summary(200, 1.0)},
              {OTHER: summary(200, 1.0), BASELINE: summary(100, 2.0)}]
    assert spread_table(rounds).splitlines()[0] == f"| metric | {BASELINE} | {OTHER} |"


def test_ratio_table_for_one_round_is_unchanged():
    table = ratio_table({BASELINE: summary(100, 2.0), OTHER: summary(200, 1.0)})
    assert row(table, "TTFT p50") == ["100 (1.00x)", "200 (2.00x)"]


def test_rotation():
    policies = ["a", "b", "c", "d"]
    assert rotated(policies, 0) == ["a", "b", "c", "d"]
    assert rotated(policies, 1) == ["b", "c", "d", "a"]
    assert rotated(policies, 3) == ["d", "a", "b", "c"]
    assert rotated(policies, 5) == rotated(policies, 1)  # more rounds than policies wrap around
    assert [rotated(policies, r)[0] for r in range(4)] == policies  # every policy runs first once
    assert rotated([], 2) == []


def test_run_labels():
    assert run_label("static:megatron", 0, 1) == "static_megatron"
    assert run_label("static:megatron", 2, 3) == "static_megatron_r2"
