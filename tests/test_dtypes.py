"""bfloat16 and ``dtype: auto``: what a pool runs when it names no dtype, and how close bfloat16 is to the reference.

float32 is exact against transformers (tests/test_single_device.py, test_partitioned.py, test_layouts.py: logits
within 1e-4). bfloat16 is compared with transformers run in bfloat16, the answer a user of either would get:
- one device computes the same ops in the same order as transformers, so its logits agree within ``BF16_ONE_DEVICE``
  of the logits' scale (identical here), and its greedy tokens are transformers' bfloat16 greedy tokens;
- p > 1 devices sum partial products in another order (all-reduce, gathered blocks), and bfloat16 keeps 8 bits of
  mantissa: their logits agree within ``BF16_PARTITIONED`` of the scale (measured 0.5-0.6% on the tiny models), and
  the top token is the same wherever transformers' top two are further apart than that error could bridge.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import TINY_SHAPES, local_engine, prompts_for

from app.engine.params import SamplingParams
from placement.hardware import fast_dtype
from placement.workers import LocalGroup
from strategies.dtypes import dtype_name
from strategies.kv_cache import Chunk
from strategies.layout import STRATEGY_NAMES
from strategies.loader import Checkpoint

BF16_ONE_DEVICE = 1e-2  # of max |logit|: the same kernels in the same order (measured: 0 on this AVX2 CPU)
BF16_PARTITIONED = 2e-2  # of max |logit|: sums in another order, each rounded to bfloat16's 8 mantissa bits
BLOCK = 16


@functools.lru_cache(maxsize=4)
def hf_bfloat16(path: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def bf16_logits(path: str, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' bfloat16 logits of every prompt token, prompts concatenated [sum T, V], as float32."""
    with torch.no_grad():
        return torch.cat([hf_bfloat16(path)(torch.tensor([p])).logits[0].float() for p in prompts])


def bf16_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_bfloat16(path).generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def whole_chunks(prompts: list[list[int]]) -> tuple[list[Chunk], int]:
    """Each prompt as one chunk with blocks of its own; the blocks used."""
    chunks, used = [], 0
    for p in prompts:
        n = -(-len(p) // BLOCK)
        chunks.append(Chunk(p, 0, list(range(used, used + n))))
        used += n
    return chunks, used


def test_auto_is_bfloat16_only_where_the_cpu_multiplies_it_natively():
    """``dtype: auto`` (every pool's default) on this CPU, and the group reports what it resolved to."""
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    expected = torch.bfloat16 if native and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert fast_dtype("cpu") == expected


def test_a_group_asked_for_auto_runs_and_reports_the_resolved_dtype(tiny_models):
    group = LocalGroup(model=tiny_models["gqa"], block_size=BLOCK, num_blocks=8, dtype="auto")
    assert group.dtype_name() == dtype_name(fast_dtype("cpu"))
    assert LocalGroup(model=tiny_models["gqa"], block_size=BLOCK, num_blocks=8, dtype="bfloat16").dtype_name() \
        == "bfloat16"


@pytest.mark.parametrize("model", [*sorted(TINY_SHAPES), "smollm2"])
def test_bfloat16_on_one_device_is_transformers_in_bfloat16(tiny_models, smollm2, model):
    path = smollm2 if model == "smollm2" else tiny_models[model]
    if model == "smollm2":
        tok = Checkpoint(path).tokenizer()
        prompts = [tok(t)["input_ids"] for t in ("The quick brown fox jumps over the lazy dog because",
                                                 "The capital of France is")]
    else:
        prompts = prompts_for(512)
    chunks, used = whole_chunks(prompts)
    group = LocalGroup(model=path, block_size=BLOCK, num_blocks=used, dtype="bfloat16")
    logits = group.forward(chunks, "megatron", all_logits=True).float()
    ref = bf16_logits(path, prompts)
    assert (logits - ref).abs().max().item() <= BF16_ONE_DEVICE * ref.abs().max().item()
    engine = local_engine(path, eos=[], max_num_seqs=1, max_model_len=128, dtype="bfloat16")
    seq = engine.generate([prompts[0]], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert seq.output_ids == bf16_greedy(path, prompts[0], 16)


def test_every_strategy_in_bfloat16_on_two_devices_agrees_with_transformers(worker_groups, tiny_models):
    """gloo carries bfloat16; every named strategy's partial sums stay within the stated tolerance, on every tiny
    shape (one group of workers, loading each model in turn)."""
    prompts = prompts_for(512, lengths=(7, 19, 3), seed=7)
    chunks, used = whole_chunks(prompts)
    for shape in sorted(TINY_SHAPES):
        group = worker_groups.get(2, dict(model=tiny_models[shape], block_size=BLOCK, num_blocks=used,
                                          replica_budget_bytes=2**30, dtype="bfloat16"))
        assert group.dtype_name() == "bfloat16"
        ref = bf16_logits(tiny_models[shape], prompts)
        tol = BF16_PARTITIONED * ref.abs().max().item()
        top2 = ref.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * tol  # positions whose top token no error within tol could change
        for strategy in STRATEGY_NAMES:
            logits = group.forward(chunks, strategy, all_logits=True).float()
            err = (logits - ref).abs().max().item()
            assert err <= tol, (shape, strategy, err / ref.abs().max().item())
            assert torch.equal(logits.argmax(-1)[clear], ref.argmax(-1)[clear]), (shape, strategy)
