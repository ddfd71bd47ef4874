"""The engine on one device reproduces transformers: float32 logits within 1e-4 and identical greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPES, local_engine, prompts_for, reference_greedy, reference_logits

from app.engine.sampling import SamplingParams
from placement.workers import LocalGroup
from strategies.kv_cache import Chunk
from strategies.loader import Checkpoint

GREEDY_32 = SamplingParams(max_tokens=32, ignore_eos=True)


def whole_prompts(path: str, prompts: list[list[int]], block_size: int = 16):
    """A runner on one device, and each prompt as one chunk with blocks of its own."""
    tables, next_block = [], 0
    for p in prompts:
        n = -(-len(p) // block_size) + 1
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    group = LocalGroup(model=path, block_size=block_size, num_blocks=next_block)
    return group, [Chunk(p, 0, t) for p, t in zip(prompts, tables)]


@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_prefill_logits_match_transformers(tiny_models, shape):
    path = tiny_models[shape]
    prompts = prompts_for(512)
    group, chunks = whole_prompts(path, prompts)
    logits = group.call("forward", chunks, "megatron", True)
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
    group, chunks = whole_prompts(smollm2, [prompt])
    logits = group.call("forward", chunks, "megatron", True)
    assert (logits - reference_logits(smollm2, prompt)).abs().max().item() <= 1e-4
    engine = local_engine(smollm2, eos=[], max_num_seqs=1, max_model_len=128)
    assert engine.generate([prompt], GREEDY_32)[0].output_ids == reference_greedy(smollm2, prompt, 32)


def test_smollm2_knows_the_capital_of_france(smollm2):
    ckpt = Checkpoint(smollm2)
    tok = ckpt.tokenizer()
    engine = local_engine(smollm2, tok, max_num_seqs=1, max_model_len=128)
    seq = engine.generate([tok("The capital of France is")["input_ids"]], SamplingParams(max_tokens=8))[0]
    assert "Paris" in seq.text


def test_exported_kv_continues_in_another_runner(tiny_models):
    """The disaggregation primitive: a decode runner adopting a prefill runner's K/V decodes the same tokens."""
    path = tiny_models["odd"]
    prompt = prompts_for(512, lengths=(13,))[0]
    prefill, (chunk,) = whole_prompts(path, [prompt])
    decode = LocalGroup(model=path, block_size=16, num_blocks=8)
    first = int(prefill.call("forward", [chunk], "megatron").argmax(-1))
    table = [5, 2]  # other blocks than the prefill's: the K/V moves by block table
    decode.call("import_kv", [table], prefill.call("export_kv", [(chunk.blocks, len(prompt))]))
    tokens = [first]
    for i in range(8):
        tokens.append(int(decode.call("forward", [Chunk([tokens[-1]], len(prompt) + i, table)]).argmax(-1)))
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
    group, chunks = whole_prompts(path, [prompt])
    logits = group.call("forward", chunks, "megatron", True)
    assert (logits - reference_logits(path, prompt)).abs().max().item() <= 1e-4
    seq = local_engine(path, max_model_len=160).generate([prompt], GREEDY_32)[0]
    assert seq.output_ids == reference_greedy(path, prompt, 32)
