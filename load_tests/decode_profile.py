"""Where a decode step's time goes: the in-process engine (one device, the shipped ``short`` pool's one thread) at
several batch sizes and dtypes, each step timed, then ``torch.profiler``'s top ops for the largest batch.

Issue 21 asks for the engine's step "in the order the profile says"; this is that profile, and it says what the CPU
can do in bfloat16 (``torch``'s oneDNN bf16 support, the CPU capability it dispatches to) next to the numbers, since a
CPU without AVX512-BF16/AMX runs bfloat16 GEMMs emulated and slower than float32.

``python -m load_tests.decode_profile --batches 1,16 --dtypes float32,bfloat16``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from app.cli.format import markdown_table, positive_ints, spread
from load_tests.engine_runs import machine, random_prompt
from load_tests.compare import rotated


def cpu_bf16() -> dict:
    """What this CPU offers bfloat16 through torch: the vector ISA torch dispatches to and oneDNN's bf16 support."""
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def decode_engine(model: str, dtype: str, batch: int, prompt: int = 64, max_tokens: int = 512, pack: bool = True):
    """An engine on one in-process device holding ``batch`` sequences past their prefill, decoding; ``pack``: its
    weights prepacked for the GEMM (strategies/packed.py), as engines run by default."""
    from app.engine.llm_engine import LLMEngine
    from app.engine.params import SamplingParams
    from placement.workers import LocalGroup
    from strategies.loader import Checkpoint

    ckpt = Checkpoint(model)
    block_size = 16
    blocks = batch * -(-(prompt + max_tokens) // block_size)
    group = LocalGroup(threads=1, model=str(ckpt.path), block_size=block_size, num_blocks=blocks,
                       dtype=getattr(torch, dtype), pack_weights=pack)
    engine = LLMEngine(group, None, [], num_blocks=blocks, block_size=block_size, max_model_len=prompt + max_tokens,
                       max_num_seqs=batch, max_num_batched_tokens=batch * prompt)
    for i in range(batch):
        engine.add(random_prompt(prompt, ckpt.shape.vocab_size, seed=i), SamplingParams(max_tokens=max_tokens,
                                                                                        ignore_eos=True))
    engine.step()  # the prompts' prefill
    for _ in range(3):  # first decode steps allocate
        engine.step()
    return engine


def step_s(engine, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1,16", help="sequences decoding together (comma-separated)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--weights", default="packed", help="packed, plain or both (comma-separated): the weights "
                                                        "prepacked for the GEMM (the default) or as loaded")
    ap.add_argument("--rounds", type=int, default=1, help="repeats, the order of --weights rotated each round")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence (the context decode attends)")
    ap.add_argument("--top", type=int, default=12, help="profiler rows for the largest batch of each dtype")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    batches = positive_ints(args.batches, "batches")
    kinds = args.weights.split(",")
    print(f"machine: {machine()}; bfloat16 on this CPU: {cpu_bf16()}")
    steps: dict[tuple[str, str, int], list[float]] = {}
    for r in range(args.rounds):
        for kind in rotated(kinds, r):
            for dtype in args.dtypes.split(","):
                for batch in batches:
                    engine = decode_engine(args.model, dtype, batch, prompt=args.prompt, pack=kind == "packed")
                    s = step_s(engine, args.steps)
                    steps.setdefault((kind, dtype, batch), []).append(s)
                    print(f"round {r + 1} {kind} {dtype} {batch}: {s * 1e3:.1f} ms", flush=True)
                    if batch == max(batches) and r == 0 and args.top:
                        from torch.profiler import ProfilerActivity, profile

                        with profile(activities=[ProfilerActivity.CPU]) as prof:
                            step_s(engine, 5)
                        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    rows = []
    for (kind, dtype, batch), xs in steps.items():
        one = statistics.median(steps[(kind, dtype, min(batches))])
        row = [kind, dtype, batch, spread([x * 1e3 for x in xs], 1), f"{statistics.median(xs) / one:.2f}x",
               f"{batch / statistics.median(xs):.1f}"]
        if kind != kinds[0]:  # against the first kind, round by round
            row.append(spread([a / b for a, b in zip(xs, steps[(kinds[0], dtype, batch)])], 2))
        rows.append(row)
    print(markdown_table(["weights", "dtype", "sequences", "decode step ms", "vs fewest sequences", "tokens/s",
                          f"vs {kinds[0]}"], [row + [""] * (7 - len(row)) for row in rows]))


if __name__ == "__main__":
    main()
