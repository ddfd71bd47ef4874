"""``python -m load_tests.overhead``: what Ray Serve adds, for the same requests, measured in one run.

The same prompts (one at a time, so queueing does not enter) go first straight to an in-process engine (tokenize,
``LLMEngine`` on one device, detokenize), then through the Serve application (HTTP streaming client → proxy →
ingress → engine replica with its shard worker). TTFT and TPOT are compared at p50 as a ratio (served / direct).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np

from load_tests.compare import build_app, wait_ready
from strategies.shapes import DEFAULT_MODEL


def direct(model: str, prompts: list[str], max_tokens: int) -> tuple[list[float], list[float]]:
    from app.engine.build import EngineOptions, build_engine
    from app.engine.params import SamplingParams

    engine = build_engine(EngineOptions(model=model, devices=1, max_num_seqs=4, hardware="cpu"))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate([engine.tokenizer("warm up")["input_ids"]], params)
    ttft, tpot = [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        seq = engine.add(engine.tokenizer(prompt)["input_ids"], params, strategy="megatron")
        while not seq.finished:
            engine.step()
        ttft.append(seq.t_first_token - t0)
        tpot.append(seq.tpot_s)
    engine.group.shutdown()
    return ttft, tpot


def served(model: str, prompts: list[str], max_tokens: int, port: int) -> tuple[list[float], list[float]]:
    from ray import serve

    from load_tests.client import run_load
    from cost.workloads import Request

    app = build_app("app.serve.app:build_app", {
        "model": model, "shared_weights": False, "policy": "static:megatron", "graceful_shutdown_s": 2,
        "pools": [{"name": "cpu1", "hardware": "cpu", "devices": 1, "max_num_seqs": 4, "num_replicas": 1}]})
    serve.run(app, name="overhead", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    reqs = [Request(arrival_s=0, prompt_tokens=1, output_tokens=max_tokens) for _ in prompts]
    asyncio.run(run_load(url, model, reqs[:1], prompts[:1], concurrency=1, progress=False,
                         extra_body={"ignore_eos": True}))  # warm-up
    records, _ = asyncio.run(run_load(url, model, reqs, prompts, concurrency=1, progress=False,
                                      extra_body={"ignore_eos": True}))
    serve.delete("overhead")
    bad = [r.error for r in records if not r.ok]
    if bad:
        raise RuntimeError(f"served requests failed: {bad}")
    return [r.ttft_s for r in records], [r.tpot_s for r in records]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--lengths", default="16,128,512", help="prompt tokens; each repeated --repeats times")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from load_tests.client import PromptMaker
    from placement.workers import local_ray_options
    from strategies.loader import Checkpoint

    maker = PromptMaker(Checkpoint(args.model).tokenizer())
    prompts = [maker.make(int(n)) for n in args.lengths.split(",") for _ in range(args.repeats)]
    d_ttft, d_tpot = direct(args.model, prompts, args.max_tokens)
    ray.init(**local_ray_options())
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        s_ttft, s_tpot = served(args.model, prompts, args.max_tokens, args.port)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{len(prompts)} requests, prompts {args.lengths} tokens, {args.max_tokens} output tokens, one at a time")
    print("| metric (p50) | direct engine | through Serve | ratio |\n|---|---|---|---|")
    for name, d, s in (("TTFT ms", d_ttft, s_ttft), ("TPOT ms", d_tpot, s_tpot)):
        dm, sm = np.median(d) * 1e3, np.median(s) * 1e3
        print(f"| {name} | {dm:.1f} | {sm:.1f} | {sm / dm:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
