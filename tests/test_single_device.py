"""The engine on one device reproduces transformers: float32 logits within 1e-4 and identical greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPES, prompts_for, reference_greedy, reference_logits

from app.engine.llm_engine import LLMEngine
from app.engine.sampling import SamplingParams
from placement.workers import LocalGroup
from strategies.loader import Checkpoint

GREEDY_32 = SamplingParams(max_tokens=32, ignore_eos=True)


def local_engine(path: str, slots: int = 4, capacity: int = 256) -> LLMEngine:
    group = LocalGroup(model=path, slots=slots, capacity=capacity)
    ckpt = Checkpoint(path)
    return LLMEngine(group, None, ckpt.eos_token_ids(), slots=slots, capacity=capacity)


@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_prefill_logits_match_transformers(tiny_models, shape):
    path = tiny_models[shape]
    group = LocalGroup(model=path, slots=3, capacity=64)
    prompts = prompts_for(512)
    logits = group.call("prefill", prompts, [0, 1, 2], "megatron", True)
    ref = torch.cat([reference_logits(path, p) for p in prompts])
    assert (logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_32_greedy_tokens_match_transformers(tiny_models, shape):
    path = tiny_models[shape]
    prompt = prompts_for(512, lengths=(11,))[0]
    seq = local_engine(path).generate([prompt], GREEDY_32)[0]
    assert seq.output_ids == reference_greedy(path, prompt, 32)


def test_batch_of_different_lengths_equals_each_alone(tiny_models):
    path = tiny_models["gqa"]
    prompts = prompts_for(512, lengths=(5, 23, 1, 12), seed=3)
    together = [s.output_ids for s in local_engine(path).generate(prompts, GREEDY_32)]
    alone = [local_engine(path).generate([p], GREEDY_32)[0].output_ids for p in prompts]
    assert together == alone


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2):
    ckpt = Checkpoint(smollm2)
    prompt = ckpt.tokenizer()("The quick brown fox jumps over the lazy dog because")["input_ids"]
    group = LocalGroup(model=smollm2, slots=1, capacity=128)
    logits = group.call("prefill", [prompt], [0], "megatron", True)
    assert (logits - reference_logits(smollm2, prompt)).abs().max().item() <= 1e-4
    engine = LLMEngine(LocalGroup(model=smollm2, slots=1, capacity=128), None, [], slots=1, capacity=128)
    assert engine.generate([prompt], GREEDY_32)[0].output_ids == reference_greedy(smollm2, prompt, 32)


def test_smollm2_knows_the_capital_of_france(smollm2):
    ckpt = Checkpoint(smollm2)
    tok = ckpt.tokenizer()
    engine = LLMEngine(LocalGroup(model=smollm2, slots=1, capacity=128), tok, ckpt.eos_token_ids(), slots=1,
                       capacity=128)
    seq = engine.generate([tok("The capital of France is")["input_ids"]], SamplingParams(max_tokens=8))[0]
    assert "Paris" in seq.text


def test_exported_kv_continues_in_another_runner(tiny_models):
    """The disaggregation primitive: a decode runner adopting a prefill runner's K/V decodes the same tokens."""
    path = tiny_models["odd"]
    prompt = prompts_for(512, lengths=(13,))[0]
    prefill = LocalGroup(model=path, slots=2, capacity=64)
    decode = LocalGroup(model=path, slots=2, capacity=64)
    first = int(prefill.call("prefill", [prompt], [1], "megatron").argmax(-1))
    decode.call("import_kv", [0], prefill.call("export_kv", [1]))
    tokens = [first]
    for _ in range(8):
        tokens.append(int(decode.call("decode", [tokens[-1]], [0]).argmax(-1)))
    assert tokens == reference_greedy(path, prompt, 9)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
], ids=lambda r: r["rope_type"])
def test_rope_scaling_types_match_transformers(tmp_path, rope):
    from conftest import tiny_config

    from strategies.loader import save_random_llama

    max_pos = 32 if rope["rope_type"] == "dynamic" else 128  # dynamic rescales once the prompt passes max_pos
    path = str(save_random_llama(tiny_config("gqa", rope_parameters=rope, max_position_embeddings=max_pos), tmp_path))
    prompt = prompts_for(512, lengths=(40,))[0]
    logits = LocalGroup(model=path, slots=1, capacity=160).call("prefill", [prompt], [0], "megatron", True)
    assert (logits - reference_logits(path, prompt)).abs().max().item() <= 1e-4
    seq = local_engine(path, capacity=160).generate([prompt], GREEDY_32)[0]
    assert seq.output_ids == reference_greedy(path, prompt, 32)
