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
import time

import torch

from app.cli.format import markdown_table, positive_ints
from app.cli.bench_runs import machine, random_prompt


def cpu_bf16() -> dict:
    """What this CPU offers bfloat16 through torch: the vector ISA torch dispatches to and oneDNN's bf16 support."""
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def decode_engine(model: str, dtype: str, batch: int, prompt: int = 64, max_tokens: int = 512):
    """An engine on one in-process device holding ``batch`` sequences past their prefill, decoding."""
    from app.engine.llm_engine import LLMEngine
    from app.engine.sampling import SamplingParams
    from placement.workers import LocalGroup
    from strategies.loader import Checkpoint

    ckpt = Checkpoint(model)
    block_size = 16
    blocks = batch * -(-(prompt + max_tokens) // block_size)
    group = LocalGroup(threads=1, model=str(ckpt.path), block_size=block_size, num_blocks=blocks,
                       dtype=getattr(torch, dtype))
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
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    ap.add_argument("--top", type=int, default=12, help="profiler rows for the largest batch of each dtype")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    batches = positive_ints(args.batches, "batches")
    print(f"machine: {machine()}; bfloat16 on this CPU: {cpu_bf16()}")
    rows = []
    for dtype in args.dtypes.split(","):
        base = None
        for batch in batches:
            engine = decode_engine(args.model, dtype, batch)
            s = step_s(engine, args.steps)
            base = base or s
            rows.append([dtype, batch, f"{s * 1e3:.1f}", f"{s / base:.2f}x", f"{batch / s:.1f}"])
            print(rows[-1], flush=True)
            if batch == max(batches):
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step_s(engine, 5)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(markdown_table(["dtype", "sequences", "decode step (ms)", "vs 1 sequence", "tokens/s"], rows))


if __name__ == "__main__":
    main()
