"""The engine on one device reproduces transformers: float32 logits within 1e-4 and identical greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_SHAPES, local_engine, prompts_for, reference_greedy, reference_logits

from app.engine.params import SamplingParams
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


LEGACY_ROPE = [  # config.json as checkpoints on the Hub spell it (transformers 4: rope_theta and rope_scaling apart)
    {"rope_theta": 500000.0},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 64},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, "rope_theta": 500000.0},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}},
    {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5] * 8},
     "original_max_position_embeddings": 64, "max_position_embeddings": 256},
    {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 128}},
]


@pytest.mark.parametrize("rope", LEGACY_ROPE, ids=lambda r: json.dumps(r)[:40])
def test_rotary_tables_are_transformers_own_for_every_spelling(tmp_path, rope):
    """The engine reads a checkpoint's config without ``LlamaConfig`` (``Checkpoint.config``) and builds its rotary
    tables without ``LlamaRotaryEmbedding`` (both cost each worker process seconds to import): the tables must still
    be the reference's bit for bit, for every rope type and either spelling of config.json, past the trained context
    too (dynamic and longrope switch frequencies there)."""
    from conftest import tiny_config
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from strategies.layers import Rotary
    from strategies.loader import Checkpoint, save_random_llama

    path = save_random_llama(tiny_config("gqa"), tmp_path)
    saved = json.loads((path / "config.json").read_text())
    saved.pop("rope_parameters", None)
    (path / "config.json").write_text(json.dumps({**saved, **rope}))
    ours, reference = Rotary(Checkpoint(path).config), LlamaRotaryEmbedding(LlamaConfig.from_pretrained(path))
    assert Checkpoint(path).config.rope_parameters == reference.config.rope_parameters
    for length in (7, 300, 40):  # past max_position_embeddings and back
        positions = torch.arange(length)
        cos, sin = reference(torch.empty(0), positions[None])
        assert all(torch.equal(a, b[0]) for a, b in zip(ours(positions, torch.float32), (cos, sin)))
