"""The load harness's metric arithmetic, against timings made by hand."""

from __future__ import annotations

import json

import pytest

from load_tests.metrics import SLO, RequestRecord, Stat, summarize, summarize_by


def rec(sent, chunks, done, out=None, error=None, pool="cpu", strategy="megatron"):
    return RequestRecord(prompt_tokens=10, output_tokens=len(chunks) if out is None else out, sent_s=sent,
                         chunk_times_s=chunks, done_s=done, error=error, pool=pool, strategy=strategy)


def test_per_request_ttft_tpot_itl_latency():
    r = rec(1.0, [1.5, 1.7, 2.0, 2.1], 2.1)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.latency_s == pytest.approx(1.1)
    assert r.tpot_s == pytest.approx((1.1 - 0.5) / 3)  # vLLM: (latency - ttft) / (output tokens - 1)
    assert r.itl_s == pytest.approx([0.2, 0.3, 0.1])


def test_one_token_requests_have_no_tpot():
    assert rec(0.0, [0.3], 0.3).tpot_s is None


def test_summary_means_percentiles_and_throughput():
    records = [rec(0.0, [0.1, 0.2], 0.2), rec(0.0, [0.3, 0.5], 0.5), rec(1.0, [1.2, 1.3, 1.4], 1.4),
               rec(0.5, [], None, error="http_503")]
    s = summarize(records, duration_s=2.0)
    assert (s.completed, s.failed, s.errors) == (3, 1, {"http_503": 1})
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_throughput == pytest.approx(7 / 2.0)
    assert s.ttft_ms.mean == pytest.approx((100 + 300 + 200) / 3)
    assert s.ttft_ms.p50 == pytest.approx(200)
    assert s.e2e_ms.p90 == pytest.approx(400 + 0.8 * (500 - 400))  # latencies 200, 400, 500: interpolated
    assert s.itl_ms.n == 1 + 1 + 2


def test_percentiles_interpolate_linearly():
    st = Stat.of([10.0, 20.0, 30.0, 40.0, 50.0])
    assert (st.p50, st.p90, st.p99) == pytest.approx((30.0, 46.0, 49.6))


def test_goodput_counts_requests_meeting_every_slo():
    records = [rec(0.0, [0.1, 0.2], 0.2), rec(0.0, [0.9, 1.0], 1.0), rec(0.0, [0.1, 0.9], 0.9)]
    slo = SLO(ttft_ms=500, tpot_ms=300)
    # first meets both; second misses TTFT; third misses TPOT (800 ms per token)
    assert summarize(records, 1.0, slo).goodput == pytest.approx(1.0)
    assert summarize(records, 1.0, SLO(e2e_ms=950)).goodput == pytest.approx(2.0)


def test_failed_requests_never_count_as_good_or_in_latency():
    records = [rec(0.0, [0.1], None, error="timeout"), rec(0.0, [0.1, 0.2], 0.2)]
    s = summarize(records, 1.0, SLO(ttft_ms=1000))
    assert s.goodput == pytest.approx(1.0) and s.e2e_ms.n == 1


def test_breakdown_by_strategy_from_headers():
    records = [rec(0, [0.1, 0.2], 0.2, strategy="megatron"), rec(0, [0.4, 0.5], 0.5, strategy="weight_gathered"),
               rec(0, [0.2, 0.3], 0.3, strategy="megatron")]
    by = summarize_by(records, "strategy", 1.0)
    assert by["megatron"].completed == 2 and by["weight_gathered"].ttft_ms.mean == pytest.approx(400)


def test_vllm_bench_json_shape_and_goodput(tmp_path):
    from load_tests.run import write_results

    records = [rec(0.0, [0.1, 0.2], 0.2), rec(0.0, [0.3, 0.5], 0.5), rec(1.0, [1.2, 1.3, 1.4], 1.4),
               rec(0.5, [], None, error="http_503")]
    write_results(tmp_path, "run", records, 2.0, SLO(ttft_ms=250), model="m", request_rate=2.0)
    v = json.loads((tmp_path / "run.vllm.json").read_text())
    assert v["completed"] == 3 and v["num_prompts"] == 4 and v["model_id"] == "m" and v["request_rate"] == 2.0
    assert v["request_goodput"] == pytest.approx(2 / 2.0)  # TTFTs 100, 300, 200 ms: two meet 250 ms
    assert v["median_ttft_ms"] == pytest.approx(200) and v["p99_ttft_ms"] == pytest.approx(298)
    assert {"mean_tpot_ms", "std_itl_ms", "p90_e2el_ms", "total_token_throughput"} <= set(v)
    assert v["errors"] == ["", "", "", "http_503"] and len(v["ttfts"]) == len(v["itls"]) == 4
    assert v["ttfts"][0] == pytest.approx(0.1)  # seconds, as vLLM saves them
    write_results(tmp_path, "noslo", records, 2.0, None)
    assert json.loads((tmp_path / "noslo.vllm.json").read_text())["request_goodput"] is None


def test_records_read_where_the_server_ran_them_and_what_its_router_predicted():
    r = rec(0.0, [0.4, 0.6], 0.6, pool=None, strategy=None)
    r.named_by({"x-dynpart-pool": "short", "x-dynpart-strategy": "megatron", "x-dynpart-predicted-ttft-ms": "350.0",
                "x-dynpart-predicted-ms": "1250.5"})
    assert (r.pool, r.strategy, r.predicted_ttft_s, r.predicted_s) == ("short", "megatron", 0.35, 1.2505)
    r.named_by({})  # another server: nothing named, nothing predicted
    assert (r.pool, r.predicted_ttft_s, r.predicted_s) == (None, None, None)


def test_the_routing_report_compares_auto_with_the_best_pinned_way_per_pool():
    from load_tests.routing import by_pool, format_report

    auto = [rec(0.0, [0.5, 1.0], 1.0, pool="short"), rec(0.0, [2.0, 5.0], 5.0, pool="long")]
    for r, (ttft, e2e) in zip(auto, [(0.4, 1.2), (1.0, 3.0)]):
        r.predicted_ttft_s, r.predicted_s = ttft, e2e
    pools = by_pool(auto)
    assert pools["long"] == {"n": 1, "ttft_s": 2.0, "e2e_s": 5.0, "predicted_ttft_s": 1.0, "predicted_e2e_s": 3.0}
    results = {"4": {"auto": [{"tok_s": 10.0, "errors": 0, "pools": pools}],
                     "short": [{"tok_s": 20.0, "errors": 1, "pools": by_pool(auto[:1])}]}}
    text = format_report(results, ["auto", "short"], [4])
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3 and "0.50 [0.50–0.50]" in rows[0]  # auto at half the best pinned way's tokens/s
    assert "| long " in rows[0] and "2.00 [2.00–2.00]" in rows[0] and "| short " in rows[1]  # a row per pool
    assert "failed requests: 1" in text
