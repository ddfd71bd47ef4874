"""Partitioned execution on p real shard workers (Ray actors, gloo): every strategy, every p, exact.

For each model shape and p, one group of workers runs every prefill strategy on a batch of prompts of different
lengths: the production path's last-token logits and all-token logits equal transformers' (float32, max abs diff
<= 1e-4), and 16 greedy Megatron decode steps after the KV handoff give transformers' tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPES, prompts_for, reference_greedy, reference_logits

from app.engine.build import EngineOptions, build_engine
from placement.workers import start_group
from strategies.layout import STRATEGY_NAMES, check_devices
from strategies.loader import Checkpoint
from strategies.projection_replicated import StrategyUnavailable

DECODE_STEPS = 16


def check_group(group, path: str, prompts: list[list[int]]) -> None:
    slots = list(range(len(prompts)))
    ref_logits = torch.cat([reference_logits(path, p) for p in prompts])
    ref_tokens = [reference_greedy(path, p, DECODE_STEPS + 1) for p in prompts]
    last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    for strategy in STRATEGY_NAMES:
        group.call_all("release", slots)  # the serving path: only each prompt's last row leaves the ranks
        served = group.call("prefill", prompts, slots, strategy)
        diff = (served - ref_logits[last]).abs().max().item()
        assert served.shape == (len(prompts), ref_logits.shape[-1]) and diff <= 1e-4, f"{strategy}: last-token {diff}"
        group.call_all("release", slots)
        logits = group.call("prefill", prompts, slots, strategy, True)
        diff = (logits - ref_logits).abs().max().item()
        assert diff <= 1e-4, f"{strategy}: prefill logits differ by {diff}"
        tokens = [logits[last].argmax(-1).tolist()]
        for _ in range(DECODE_STEPS):
            tokens.append(group.call("decode", tokens[-1], slots).argmax(-1).tolist())
        assert [list(t) for t in zip(*tokens)] == ref_tokens, f"{strategy}: decode after handoff differs"
    one_token = [[prompts[0][0]]]  # fewer tokens than devices: most ranks hold only padding
    for strategy in STRATEGY_NAMES:
        group.call_all("release", slots)
        logits = group.call("prefill", one_token, [0], strategy, True)
        assert (logits - reference_logits(path, one_token[0])).abs().max().item() <= 1e-4, strategy


@pytest.mark.parametrize("devices", [1, 2, 3, 4])
def test_every_strategy_is_exact(ray_session, tiny_models, devices):
    """All shapes through one group of workers per p (the workers load each model in turn)."""
    group = None
    try:
        for shape in sorted(TINY_SHAPES):
            kwargs = dict(model=tiny_models[shape], slots=3, capacity=64, replica_budget_bytes=2**30)
            if group is None:
                group = start_group(devices, kwargs)
            elif devices > 1:
                group.load(kwargs)
            else:
                group = start_group(1, kwargs)
            check_group(group, tiny_models[shape], prompts_for(512, lengths=(7, 19, 3), seed=devices))
    finally:
        group.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 3, 4])
def test_smollm2_is_exact(ray_session, smollm2, devices):
    """SmolLM2 has 9 query and 3 KV heads: p = 3 splits them evenly, p = 2 and 4 run zero-padded heads (12 and 4)."""
    ckpt = Checkpoint(smollm2)
    layout = check_devices(ckpt.shape, devices)
    assert (layout.heads, layout.kv_heads) == ((9, 3) if devices == 3 else (12, 4))
    tok = ckpt.tokenizer()
    prompts = [tok(t)["input_ids"] for t in ("The capital of France is", "Write a haiku about partitioned matrices")]
    group = start_group(devices, dict(model=smollm2, slots=2, capacity=64, replica_budget_bytes=2**30))
    try:
        check_group(group, smollm2, prompts)
    finally:
        group.shutdown()


def test_one_weight_copy_split_over_workers(ray_session, tiny_models):
    """Each worker holds about 1/p of the weights; the gather buffer is two layers; replicas only once built."""
    path = tiny_models["gqa"]
    single = start_group(1, dict(model=path, slots=1, capacity=32, replica_budget_bytes=2**30))
    whole = single.call("memory_report")["weights"]
    group = start_group(2, dict(model=path, slots=1, capacity=32, replica_budget_bytes=2**30))
    try:
        group.call("prefill", [[1, 2, 3]], [0], "weight_gathered")
        reports = group.call_all("memory_report")
        layer_bytes = whole / Checkpoint(path).shape.num_layers
        for r in reports:
            assert 0.45 * whole <= r["weights"] <= 0.55 * whole
            assert r["replicas"] == 0
            assert 0 < r["gather_buffer"] <= 2 * layer_bytes  # two layers of full weights, reused
        group.call_all("release", [0])
        group.call("prefill", [[1, 2, 3]], [0], "projection_replicated")
        assert all(r["replicas"] > 0 for r in group.call_all("memory_report"))
    finally:
        group.shutdown()


def test_replicas_that_do_not_fit_make_the_strategy_unavailable(ray_session, tiny_models):
    path = tiny_models["mha"]
    group = start_group(2, dict(model=path, slots=2, capacity=32, replica_budget_bytes=1024))
    try:
        assert group.call("available_strategies") == ["megatron", "weight_gathered"]
        with pytest.raises(StrategyUnavailable, match="over the budget"):
            group.call("prefill", [[1, 2, 3]], [0], "projection_replicated")
        # the group is still healthy: the other strategies and decode work
        group.call("prefill", [[1, 2, 3]], [1], "weight_gathered")
        assert group.call("decode", [4], [1]).shape[0] == 1
    finally:
        group.shutdown()


def test_bad_requests_fail_before_any_worker_starts(tiny_models, monkeypatch):
    with pytest.raises(ValueError, match="more than this machine offers"):
        build_engine(EngineOptions(model=tiny_models["mha"], devices=64))
    monkeypatch.setenv("DYNPART_MAX_CPU_DEVICES", "8")
    with pytest.raises(ValueError, match="cannot be split over 5 devices"):
        build_engine(EngineOptions(model=tiny_models["mha"], devices=5))
    with pytest.raises(ValueError, match="unknown model"):
        build_engine(EngineOptions(model="llama-9000", devices=2))
    with pytest.raises(ValueError, match="unknown prefill strategy"):
        start_group(1, dict(model=tiny_models["mha"], slots=1, capacity=32)).call("prefill", [[1]], [0], "ring")
