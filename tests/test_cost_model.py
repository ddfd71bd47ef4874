"""Formulas against hand-computed values, the catalog and profiles, and the device-split rule."""

from __future__ import annotations

import json
import math

import pytest

from cost.formulas import Collective, Work, collective_time, compute_time, gemm, ops_time, split_time
from cost.hardware import (CalibrationProfile, GemmSample, Hardware, HardwareError, Link, get_hardware,
                           load_catalog, save_profile)
from cost.layouts import layer_ops, resident_bytes
from cost.search import STRATEGIES, layer_costs
from strategies.layout import check_devices
from strategies.shapes import CATALOG

# A device with round numbers: 100 TFLOP/s exactly at every row count, 1000 GB/s, 10 GB/s links, 10 µs per step.
TOY = Hardware(name="toy", peak_tflops=100, memory_bandwidth_gbs=1000, memory_gb=80, compute_efficiency=1.0,
               memory_efficiency=1.0, half_efficiency_rows=0, launch_overhead_us=0,
               link=Link(kind="test", bandwidth_gbs=10, latency_us=10))
LLAMA7 = CATALOG["llama2-7b"]


def test_ring_collectives_match_alpha_beta_by_hand():
    mb = 1_000_000
    # all-reduce on 4 devices: 2(p-1)=6 steps of 10 µs, plus 2(p-1)/p·D = 1.5 MB at 10 GB/s = 150 µs
    assert collective_time(Collective("x", "all_reduce", mb), TOY, 4) == pytest.approx(60e-6 + 150e-6)
    # all-gather and reduce-scatter: (p-1) steps, (p-1)/p·D
    assert collective_time(Collective("x", "all_gather", mb), TOY, 4) == pytest.approx(30e-6 + 75e-6)
    assert collective_time(Collective("x", "reduce_scatter", mb), TOY, 2) == pytest.approx(10e-6 + 50e-6)
    # all-to-all: (p-1)/p²·D
    assert collective_time(Collective("x", "all_to_all", mb), TOY, 4) == pytest.approx(30e-6 + 18.75e-6)
    assert collective_time(Collective("x", "all_reduce", mb), TOY, 1) == 0


def test_roofline_takes_the_slower_of_compute_and_memory():
    # 1024×4096×4096 GEMM: 34.4 GFLOP -> 344 µs at 100 TFLOP/s; bytes 2·(1024·8192 + 4096²) = 50.3 MB -> 50 µs
    big = gemm("g", 1024, 4096, 4096, 2)
    assert big.flops == 2 * 1024 * 4096 * 4096
    assert compute_time(big, TOY) == pytest.approx(big.flops / 100e12)
    # one row: memory-bound, the 33.6 MB weight read dominates
    small = gemm("g", 1, 4096, 4096, 2)
    assert compute_time(small, TOY) == pytest.approx(2 * (4096 * 4096 + 2 * 4096) / 1000e9)


def test_prefetched_gathers_hide_behind_compute():
    comp = gemm("g", 1024, 4096, 4096, 2)  # 344 µs
    gather = Collective("w", "all_gather", 2 * 4096 * 4096, prefetched=True)  # 30 µs + 0.75·33.5 MB/10 GB/s = 2.5 ms
    blocking = Collective("a", "all_reduce", 1_000_000)
    t_c, t_w = compute_time(comp, TOY), collective_time(gather, TOY, 4)
    assert ops_time([comp, gather], TOY, 4) == pytest.approx(max(t_c, t_w))
    assert ops_time([comp, gather, blocking], TOY, 4) == pytest.approx(max(t_c, t_w) + 210e-6)


def test_work_counts_causal_pairs():
    w = Work.prefill([4, 2])
    assert (w.tokens, w.attn_pairs, w.seqs) == (6, 10 + 3, 2)
    d = Work.decode([10, 20])
    assert (d.tokens, d.attn_pairs, d.kv_tokens) == (2, 32, 32)
    with pytest.raises(ValueError):
        Work.prefill([])


def test_chunks_of_a_prompt_add_up_to_the_whole_prompt():
    a, b = 300, 724
    first, second, whole = Work.chunks(a), Work.chunks(b, a), Work.prefill(a + b)
    assert first == Work.prefill(a)  # nothing cached: a chunk is a prompt
    assert first.attn_pairs + second.attn_pairs == whole.attn_pairs
    assert (second.tokens, second.kv_tokens, second.cached_tokens, second.cached_pairs) == (b, a + b, a, a * b)
    assert second.attn_pairs == b * a + b * (b + 1) // 2
    batch = Work.chunks([4, 2], [10, 0])
    assert (batch.tokens, batch.attn_pairs, batch.kv_tokens, batch.cached_tokens) == (6, 40 + 10 + 3, 16, 10)
    assert Work.chunks([4, 2], 10) == Work.chunks([4, 2], [10, 10])  # an int applies to every sequence
    for new, cached in (([4, 2], [1]), (4, -1), (0, 5), ([], 0)):
        with pytest.raises(ValueError):
            Work.chunks(new, cached)


def test_decode_is_a_one_token_chunk_after_its_context():
    d = Work.decode([10, 20])
    assert d == Work.chunks([1, 1], [10, 20])
    assert (d.cached_tokens, d.cached_pairs) == (30, 30)


def test_cached_prefix_is_gathered_for_token_sharded_attention_only():
    new, cached, p, b = 1000, 3000, 4, 2
    work = Work.chunks(new, cached)
    flops = {}
    for name, c in STRATEGIES.items():
        ops = layer_ops(c, LLAMA7, p, work, b)
        gathers = [op for op in ops if isinstance(op, Collective) and op.name == "cached k/v all-gather"]
        flops[name] = next(op.flops for op in ops if op.name == "attention")
        if name == "megatron":  # heads: each device reads its own heads of the cache
            assert not gathers
        else:
            assert [(g.kind, g.size, g.prefetched) for g in gathers] == [("all_gather", cached * 2 * 32 * 128 * b,
                                                                           False)]
    causal = new * (new + 1) // 2
    assert flops["megatron"] == pytest.approx(4 * (new * cached + causal) * 32 * 128 / p)
    # zigzag token shards: every rank's ceil(new/p) queries score their share of all pairs, cached and causal
    busiest = math.ceil(new / p) * (cached + causal / new)
    assert flops["projection_replicated"] == pytest.approx(4 * busiest * 32 * 128)
    one = layer_ops(STRATEGIES["weight_gathered"], LLAMA7, 1, work, b)
    assert not any(isinstance(op, Collective) for op in one)


def test_cached_prefix_adds_its_gather_to_token_sharded_blocking_time_and_nothing_to_megatron():
    p, b = 4, 2
    plain, chunk = Work.chunks(512), Work.chunks(512, 2048)
    gather = collective_time(Collective("x", "all_gather", 2048 * 2 * 32 * 128 * b), TOY, p)
    for name, c in STRATEGIES.items():
        before = split_time(layer_ops(c, LLAMA7, p, plain, b), TOY, p)[0]
        after = split_time(layer_ops(c, LLAMA7, p, chunk, b), TOY, p)[0]
        assert after - before == pytest.approx(0 if name == "megatron" else gather)


def test_megatron_layer_costs_by_hand():
    t, p, e, b = 512, 4, 4096, 2
    c = layer_costs(STRATEGIES["megatron"], LLAMA7, TOY, p, t)
    assert c.activation_bytes == pytest.approx(4 * (p - 1) / p * t * e * b)  # two all-reduces of T·E
    assert c.latency_steps == 4 * (p - 1)
    assert c.weight_bytes == 0
    p_l = 2 * e * e + 2 * e * e + 3 * e * 11008  # Llama 2 7B is MHA: Hkv·dh = E
    attn = 4 * (t * (t + 1) // 2) * 32 * 128 / p
    assert c.flops == pytest.approx(2 * p_l * t / p + attn)


def test_token_sharded_strategies_by_hand():
    t, p, b = 1024, 4, 2
    p_l = LLAMA7.params_per_layer
    kv_gather = (p - 1) / p * 2 * t * 32 * 128 * b
    wg = layer_costs(STRATEGIES["weight_gathered"], LLAMA7, TOY, p, t)
    assert wg.weight_bytes == pytest.approx((p - 1) / p * p_l * b)
    assert wg.activation_bytes == pytest.approx(kv_gather)
    assert wg.latency_steps == 2 * (p - 1)  # one weight gather (the layer's flat buffer), one K/V gather
    pr = layer_costs(STRATEGIES["projection_replicated"], LLAMA7, TOY, p, t)
    assert (pr.activation_bytes, pr.weight_bytes, pr.latency_steps) == (pytest.approx(kv_gather), 0, p - 1)


def test_megatron_comm_grows_with_tokens_weight_gathering_does_not():
    def comm(name, t):
        c = layer_costs(STRATEGIES[name], LLAMA7, TOY, 4, t)
        return c.activation_bytes, c.weight_bytes

    m_short, m_long = comm("megatron", 128), comm("megatron", 4096)
    assert m_long[0] == pytest.approx(32 * m_short[0])
    w_short, w_long = comm("weight_gathered", 128), comm("weight_gathered", 4096)
    assert w_long[1] == w_short[1] > 0  # the weight gather does not depend on T
    assert w_long[0] < m_long[0] / 1.9  # only K/V grows: half of Megatron's two all-reduces for an MHA model


def test_resident_memory_one_copy_plus_buffers():
    p, b = 4, 2
    layers, p_l, e = 32, LLAMA7.params_per_layer, 4096
    emb = 2 * 32000 * e
    mega = resident_bytes(STRATEGIES["megatron"], LLAMA7, p, b)
    assert mega == pytest.approx((layers * (p_l / p + 2 * e) + emb / p) * b)
    wg = resident_bytes(STRATEGIES["weight_gathered"], LLAMA7, p, b)
    assert wg - mega == pytest.approx(2 * p_l * b)  # a two-layer gather buffer
    pr = resident_bytes(STRATEGIES["projection_replicated"], LLAMA7, p, b)
    assert pr - mega == pytest.approx(layers * (p - 1) / p * p_l * b)


def test_catalog_has_every_required_device_and_datasheet_figures():
    cat = load_catalog()
    for name in ("L4", "A10G", "A100-40GB-SXM", "A100-80GB-SXM", "A100-40GB-PCIe", "A100-80GB-PCIe", "H100-SXM",
                 "H100-PCIe", "H200", "cpu"):
        assert name in cat
    assert cat["L4"].peak_tflops == 121 and cat["H200"].memory_gb == 141
    assert cat["A100-80GB-SXM"].link.bandwidth_gbs > 5 * cat["L4"].link.bandwidth_gbs  # NVLink vs PCIe
    assert get_hardware("l4").name == "L4"  # case-insensitive


def test_user_file_adds_and_replaces_entries(tmp_path, monkeypatch):
    f = tmp_path / "hw.json"
    f.write_text(json.dumps({"devices": {
        "L4-noP2P": {"peak_tflops": 121, "memory_bandwidth_gbs": 300, "memory_gb": 24,
                     "link": {"kind": "host-staged", "bandwidth_gbs": 10, "latency_us": 30}},
        "L4": {"peak_tflops": 1, "memory_bandwidth_gbs": 1, "memory_gb": 1,
               "link": {"kind": "x", "bandwidth_gbs": 1, "latency_us": 1}}}}))
    assert get_hardware("L4-noP2P", [f]).link.bandwidth_gbs == 10
    monkeypatch.setenv("DYNPART_HARDWARE", str(f))
    assert get_hardware("L4").peak_tflops == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"devices": {"X": {"peak_tflops": -1}}}')
    with pytest.raises(HardwareError, match="not a valid catalog"):
        load_catalog([bad])
    with pytest.raises(HardwareError, match="unknown hardware 'Z9'"):
        get_hardware("Z9")


def test_cpu_uses_a_calibration_profile_when_one_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNPART_PROFILE_DIR", str(tmp_path))
    default = get_hardware("cpu")
    assert default.calibrated_from is None
    prof = CalibrationProfile(hardware="cpu", devices=2, gemm=(GemmSample(rows=16, tflops=0.01),
                                                               GemmSample(rows=256, tflops=0.05)),
                              memory_bandwidth_gbs=12.0, collectives={"all_reduce": {"latency_us": 100,
                                                                                     "bandwidth_gbs": 2}})
    save_profile(prof)
    cal = get_hardware("cpu")
    assert cal.calibrated_from and cal.flops_per_s(16) == pytest.approx(0.01e12)
    assert cal.flops_per_s(64) == pytest.approx(0.03e12)  # halfway in log(rows)
    assert cal.flops_per_s(4096) == pytest.approx(0.05e12)
    assert cal.alpha_beta("all_reduce") == (pytest.approx(100e-6), pytest.approx(2e9))
    assert cal.alpha_beta("all_gather") == default.alpha_beta("all_gather")  # unmeasured kinds keep the link's
    (tmp_path / "cpu.json").write_text("{}")
    with pytest.raises(HardwareError, match="re-run"):
        get_hardware("cpu")


def test_check_devices_pads_replicates_and_refuses():
    smol = CATALOG["smollm2-135m"]  # 9 query heads, 3 KV heads
    lay = check_devices(smol, 2)
    assert (lay.heads, lay.kv_heads, lay.heads_per_device) == (12, 4, 6)
    assert check_devices(smol, 3).heads == 9
    big = check_devices(CATALOG["llama2-70b"], 16)  # 8 KV heads, 16 devices: replicate each KV head twice
    assert (big.kv_replication, big.kv_heads_per_device, big.heads_per_device) == (2, 1, 4)
    assert check_devices(CATALOG["llama2-13b"], 3).intermediate % 3 == 0
    for bad, msg in ((0, "at least 1"), (-2, "at least 1"), (10, "at most 9"), (2.0, "whole number")):
        with pytest.raises(ValueError, match=msg):
            check_devices(smol, bad)


def test_weight_gathered_is_priced_one_weight_gather_per_layer_as_the_engine_issues():
    """The engine all-gathers a layer's flat shard buffer once (all four matrices); the model charged four gathers
    (four latency terms) before."""
    from cost.layouts import layer_ops, matrix_dims
    from cost.search import STRATEGIES

    b = 2
    ops = layer_ops(STRATEGIES["weight_gathered"], LLAMA7, 4, Work.prefill(1024), b)
    gathers = [op for op in ops if isinstance(op, Collective) and op.prefetched]
    assert len(gathers) == 1
    assert gathers[0].size == sum(k * n for k, n in matrix_dims(LLAMA7).values()) * b


def test_calibration_records_its_noise_and_the_planner_reads_it(tmp_path, monkeypatch):
    """``relative_spread`` of repeated timings (robust: one disturbed repeat does not count), the larger of a
    measurement's and the decode step's goes into the profile, and the calibrated hardware carries it."""
    from cost.fit import measurement_spread
    from placement.calibrate import relative_spread

    assert relative_spread([0.1]) == 0.0
    assert relative_spread([1.0, 1.0, 1.0, 1.0, 9.0]) == 0.0
    assert relative_spread([0.9, 1.0, 1.1]) == pytest.approx(0.14826)
    assert measurement_spread({"spread": 0.02, "decode_spread": 0.04}) == 0.04
    assert measurement_spread({}) is None
    monkeypatch.setenv("DYNPART_PROFILE_DIR", str(tmp_path))
    assert get_hardware("cpu").prediction_spread == 0.0
    save_profile(CalibrationProfile(hardware="cpu", devices=2, gemm=(GemmSample(rows=16, tflops=0.01),), spread=0.03))
    assert get_hardware("cpu").prediction_spread == 0.03
    assert get_hardware("cpu").time_shared(0.5).prediction_spread == 0.03
