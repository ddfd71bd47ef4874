"""A layout is the unit of execution: every layout of the executable front runs exactly, issues exactly the
collectives the cost model prices for it, and holds the memory it prices; labels are accepted wherever a strategy is.

For each tiny shape (MHA, GQA, MQA, odd heads) and p ∈ {1, 2, 3, 4}, one group of workers runs every member of that
shape's executable front (``executable_layouts``: the named strategies and the Pareto front on this hardware):
float32 logits of every token equal transformers' (≤ 1e-4) through non-contiguous block tables, the greedy Megatron
decode after the handoff gives transformers' tokens, a chunk after a cached prefix gives transformers' last-token
logits through the serving path, and at p > 1 the
collectives the pass issued (``CountingComm``: kind and bytes) are exactly those of the cost model's op list for the
same work.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from conftest import TINY_SHAPES, prompts_for, reference_greedy, reference_logits
from test_partitioned import block_tables, runner_kwargs

from cost import get_hardware
from cost.formulas import Collective, Work
from cost.layouts import end_ops, layer_ops, resident_bytes
from cost.planner import executable_layouts
from strategies.kv_cache import Chunk
from strategies.layout import MEGATRON, check_devices, check_strategy, parse_layout
from strategies.loader import Checkpoint

DECODE_STEPS = 1  # the first decode step reads every K/V the layout wrote (later steps: test_partitioned.py)


def priced_collectives(label: str, path: str, p: int, new: list[int], cached: list[int]) -> Counter:
    """(kind, bytes) of every collective the cost model's op lists name for one serving pass (float32)."""
    shape = Checkpoint(path).shape
    padded = check_devices(shape, p).padded_shape(shape)
    c, work = parse_layout(label), Work.chunks(new, cached)
    ops = layer_ops(c, padded, p, work, 4) * padded.num_layers + end_ops(c, padded, p, work, 4)
    return Counter((op.kind, int(op.size)) for op in ops if isinstance(op, Collective))


def check_front(group, path: str, p: int, prompts: list[list[int]]) -> int:
    shape = Checkpoint(path).shape
    layouts = executable_layouts(shape, get_hardware("cpu"), p)
    refs = [reference_logits(path, x) for x in prompts]
    ref_tokens = [reference_greedy(path, x, DECODE_STEPS + 1) for x in prompts]
    last = torch.tensor([len(x) for x in prompts]).cumsum(0) - 1
    tables = block_tables([len(x) for x in prompts], extra=DECODE_STEPS + 1)
    whole = [Chunk(x, 0, t) for x, t in zip(prompts, tables)]
    hits = 8  # the second prompt again, its first 8 tokens cached (written by the pass before)
    after_prefix = [Chunk(prompts[1][hits:], hits, tables[1])]
    for label in layouts:
        logits = group.call("forward", whole, label, True)
        diff = (logits - torch.cat(refs)).abs().max().item()
        assert diff <= 1e-4, f"p={p} [{label}]: prefill logits differ by {diff}"
        tokens = [logits[last].argmax(-1).tolist()]
        for step in range(DECODE_STEPS):  # megatron decode reads the K/V this layout wrote
            chunks = [Chunk([t], len(x) + step, tb) for t, x, tb in zip(tokens[-1], prompts, tables)]
            tokens.append(group.call("forward", chunks).argmax(-1).tolist())
        assert [list(t) for t in zip(*tokens)] == ref_tokens, f"p={p} [{label}]: decode after the handoff differs"
        # the prefix's K/V are in the cache as a hit finds them: written by this layout's pass above (exact); the
        # serving path (only each chunk's last row leaves), with its collectives counted
        logits, calls = group.call("collectives", [*whole[:1], *after_prefix], label)
        diff = (logits - torch.cat([refs[0][-1:], refs[1][-1:]])).abs().max().item()
        assert diff <= 1e-4, f"p={p} [{label}]: serving path after a cached prefix differs by {diff}"
        issued = Counter(calls)
        priced = priced_collectives(label, path, p, [len(prompts[0]), len(after_prefix[0].ids)], [0, hits])
        assert issued == priced, (f"p={p} [{label}]: issued but not priced {issued - priced}, "
                                  f"priced but not issued {priced - issued}")
    return len(layouts)


@pytest.mark.parametrize("devices", [2, 3, 4])  # p = 1: the front is the named three (test_partitioned.py)
def test_every_front_layout_is_exact_and_priced_as_it_runs(worker_groups, tiny_models, devices):
    checked = 0
    for shape in sorted(TINY_SHAPES):
        group = worker_groups.get(devices, runner_kwargs(tiny_models[shape]))
        checked += check_front(group, tiny_models[shape], devices, prompts_for(512, (7, 19, 3), seed=devices))
    assert checked >= 4 * 10  # each front has 10 or more layouts


LAYOUTS_HELD = {  # what each holds beyond the shards: nothing, packed gathers, partial replicas, transposed shards
    "megatron": "megatron",
    "weight_gathered": "weight_gathered",
    "projection_replicated": "projection_replicated",
    "partial replicas + one gather": "residual=TOK qkv=col attn=heads o=replicated gate_up=gathered down=replicated",
    "two gathers apart": "residual=TOK qkv=gathered attn=tokens o=replicated gate_up=gathered down=replicated",
    "transposed shards": "residual=TOK qkv=row attn=redundant o=col gate_up=row down=col",
}


@pytest.mark.parametrize("devices", [3])
def test_memory_per_device_is_what_the_cost_model_prices(worker_groups, tiny_models, devices):
    """Resident weights, gather buffers, replicas and transposed shards, as each worker holds them after a prefill by
    the layout, within 3% of ``resident_bytes``: a replicated matrix is held once (the replica is built around the
    rank's shard), a transposed one costs one more p-th of it."""
    path = tiny_models["mha"]
    shape = Checkpoint(path).shape
    padded = check_devices(shape, devices).padded_shape(shape)
    for what, label in LAYOUTS_HELD.items():
        group = worker_groups.get(devices, runner_kwargs(path))  # a fresh runner: only this layout's extras
        group.call("forward", [Chunk([1, 2, 3], 0, [0])], label)
        model = resident_bytes(parse_layout(label), padded, devices, 4)
        for r in group.call_all("memory_report"):
            held = r["weights"] + r["gather_buffer"] + r["replicas"] + r["transposed"]
            assert held == pytest.approx(model, rel=0.03), (what, r, model)
    logits = group.call("forward", [Chunk([4, 5], 3, [0, 1])])  # decode still reads the shards
    assert (logits - reference_logits(path, [1, 2, 3, 4, 5])[-1:]).abs().max().item() <= 1e-4


def test_a_valid_layout_off_the_front_runs_exactly(worker_groups, tiny_models):
    label = "residual=REP qkv=row attn=tokens o=gathered gate_up=redundant down=col"
    path = tiny_models["gqa"]
    assert label not in executable_layouts(Checkpoint(path).shape, get_hardware("cpu"), 2)
    group = worker_groups.get(2, runner_kwargs(path))
    prompt = prompts_for(512, (13,), seed=3)[0]
    logits = group.call("forward", [Chunk(prompt, 0, [5, 2, 7, 1])], label, True)
    assert (logits - reference_logits(path, prompt)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("text, says", [
    ("ring", "unknown prefill strategy 'ring'"),
    ("residual=TOK qkv=col attn=heads o=row gate_up=col", "missing field(s) down"),
    ("residual=TOK qkv=diagonal attn=heads o=row gate_up=col down=row", "layout field 'qkv': 'diagonal'"),
    ("residual=FEAT qkv=col attn=heads o=row gate_up=col down=row", "layout field 'residual': 'FEAT'"),
    ("residual=TOK qkv=col attn=everywhere o=row gate_up=col down=row", "layout field 'attn': 'everywhere'"),
    ("residual=TOK qkv=col attn=heads o=row gate_up=col down=row mlp=col", "'mlp=col' is not a field"),
])
def test_a_bad_layout_label_names_the_bad_field(text, says):
    with pytest.raises(ValueError) as e:
        parse_layout(text)
    assert says in str(e.value)


def test_labels_are_strategies_everywhere_a_strategy_is_named():
    """A named layout's label is that strategy; any order of fields; the CLI and the static policy take labels."""
    from app.cli.generate import strategy_arg
    from app.serve.config import AppConfig

    assert check_strategy(MEGATRON.label) == "megatron"
    shuffled = "down=row gate_up=col o=row attn=heads qkv=col residual=REP"
    assert check_strategy(shuffled) == "megatron"
    label = LAYOUTS_HELD["partial replicas + one gather"]
    assert strategy_arg(label) == label and strategy_arg("auto") == "auto"
    assert AppConfig(pools=[{"name": "a"}], policy=f"static:{label}").default_strategy == label
    with pytest.raises(ValueError, match="layout field 'o'"):
        AppConfig(pools=[{"name": "a"}],
                  policy="static:residual=TOK qkv=col attn=heads o=sideways gate_up=col down=row")


@pytest.mark.slow
@pytest.mark.parametrize("devices", [int(p) for p in os.environ.get("DYNPART_SMOLLM2_DEVICES", "2").split(",")])
def test_every_front_layout_is_exact_on_smollm2(worker_groups, smollm2, devices):
    """SmolLM2 (9 query, 3 KV heads: zero-padded to 12/4 at p = 2 and 4, hidden 576): each layout of its executable
    front gives transformers' logits for a real prompt, and megatron decodes exactly after its handoff. The suite runs
    p = 2 (41 layouts, ~30 s); DYNPART_SMOLLM2_DEVICES=2,4 adds p = 4 (64 layouts, ~80 s more on 2 cores)."""
    ckpt = Checkpoint(smollm2)
    prompt = ckpt.tokenizer()("The capital of France is")["input_ids"]
    ref, ref_tokens = reference_logits(smollm2, prompt), reference_greedy(smollm2, prompt, 2)
    table = list(range(4))
    group = worker_groups.get(devices, runner_kwargs(smollm2))
    layouts = executable_layouts(ckpt.shape, get_hardware("cpu"), devices)
    for label in layouts:
        logits = group.call("forward", [Chunk(prompt, 0, table)], label, True)
        diff = (logits - ref).abs().max().item()
        assert diff <= 1e-4, f"p={devices} [{label}]: logits differ by {diff}"
        nxt = group.call("forward", [Chunk([ref_tokens[0]], len(prompt), table)]).argmax(-1).item()
        assert nxt == ref_tokens[1], f"p={devices} [{label}]: decode after the handoff differs"
    assert len(layouts) > 30
