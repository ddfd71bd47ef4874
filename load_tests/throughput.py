"""``python -m load_tests.throughput``: does the service keep its engine's batching? Measured in one run.

Short requests of one shape (``--prompt-tokens`` prompts, ``--max-tokens`` outputs, EOS ignored) at each concurrency
go three ways, in an order rotated every repeat, each way with prompts of its own (the same prompts twice would find
their prefixes in the service's cache the second time, and the way measured second would read less of its prompts):

- ``engine``: straight into an in-process ``LLMEngine`` built with the short pool's own engine options (closed loop:
  a new request joins as soon as one finishes, at most one per step as served requests arrive, so ``concurrency``
  are in flight), tokenizing each prompt;
- ``stream``: through the shipped Serve application (HTTP → proxy → ingress → engine replica), streamed (SSE);
- ``whole``: the same, non-streaming.

Output tokens per second (all requests' tokens over the wall time of the point), TTFT and TPOT p50/p90 per point;
the table gives medians over the repeats with their min–max spread and the service/engine ratios of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.cli.format import spread
from load_tests.compare import deploy, load_app_spec, local_serve
from load_tests.metrics import RequestRecord

MODES = ("engine", "stream", "whole")


def point(tokens: int, wall_s: float, ttft_s: list[float], tpot_s: list[float], errors: int = 0) -> dict:
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else None  # noqa: E731
    return {"tok_s": tokens / wall_s, "wall_s": wall_s, "errors": errors,
            "ttft_p50_ms": pct(ttft_s, 50), "ttft_p90_ms": pct(ttft_s, 90),
            "tpot_p50_ms": pct(tpot_s, 50), "tpot_p90_ms": pct(tpot_s, 90)}


def engine_point(engine, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Closed loop in this process: ``concurrency`` requests in flight, each prompt tokenized as it is added, at most
    one new request per step. Served requests reach the engine spread out, so each new prompt's chunks ride along
    running streams; added all at once, equal requests would run in lockstep waves (every prompt read in one step,
    then decode steps alone), a pattern the service never sees (at c=4 here: 24.6 against 22.5 out tok/s)."""
    from app.engine.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    todo, live, done = list(prompts), [], []
    t0 = time.perf_counter()
    while todo or live:
        if todo and len(live) < concurrency:
            live.append(engine.add(engine.tokenizer(todo.pop(0))["input_ids"], params))
        engine.step()
        done += [s for s in live if s.finished]
        live = [s for s in live if not s.finished]
    wall = time.perf_counter() - t0
    return point(sum(len(s.output_ids) for s in done), wall, [s.ttft_s for s in done],
                 [s.tpot_s for s in done if s.tpot_s is not None])


def service_point(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, stream: bool,
                  timeout_s: float) -> dict:
    from load_tests.client import run_load
    from cost.workloads import Request

    reqs = [Request(arrival_s=0, prompt_tokens=1, output_tokens=max_tokens) for _ in prompts]
    records, wall = asyncio.run(run_load(url, model, reqs, prompts, concurrency=concurrency, progress=False,
                                         stream=stream, timeout_s=timeout_s))
    ok: list[RequestRecord] = [r for r in records if r.ok]
    res = point(sum(r.output_tokens for r in ok), wall, [r.ttft_s for r in ok] if stream else [],
                [r.tpot_s for r in ok if r.tpot_s is not None] if stream else [], errors=len(records) - len(ok))
    return {**res, "pools": dict(Counter(str(r.pool) for r in ok))}


def format_table(results: dict, concurrencies: list[int]) -> str:
    lines = ["| concurrency | engine out tok/s | stream out tok/s | whole out tok/s | stream/engine | whole/engine |",
             "|---|---|---|---|---|---|"]
    for c in concurrencies:
        tok = {m: [r["tok_s"] for r in results[str(c)][m]] for m in MODES}
        med = {m: statistics.median(v) for m, v in tok.items()}
        lines.append(f"| {c} | {spread(tok['engine'])} | {spread(tok['stream'])} | {spread(tok['whole'])} | "
                     f"{med['stream'] / med['engine']:.2f} | {med['whole'] / med['engine']:.2f} |")
    lines += ["", "| concurrency | engine TTFT p50/p90 ms | stream TTFT p50/p90 ms | engine TPOT p50/p90 ms | "
              "stream TPOT p50/p90 ms | stream/engine TTFT p50 | stream/engine TPOT p50 |",
              "|---|---|---|---|---|---|---|"]
    for c in concurrencies:
        r = results[str(c)]
        m = lambda mode, key: statistics.median(x[key] for x in r[mode])  # noqa: E731
        lines.append(f"| {c} | {m('engine', 'ttft_p50_ms'):.0f}/{m('engine', 'ttft_p90_ms'):.0f} | "
                     f"{m('stream', 'ttft_p50_ms'):.0f}/{m('stream', 'ttft_p90_ms'):.0f} | "
                     f"{m('engine', 'tpot_p50_ms'):.1f}/{m('engine', 'tpot_p90_ms'):.1f} | "
                     f"{m('stream', 'tpot_p50_ms'):.1f}/{m('stream', 'tpot_p90_ms'):.1f} | "
                     f"{m('stream', 'ttft_p50_ms') / m('engine', 'ttft_p50_ms'):.2f} | "
                     f"{m('stream', 'tpot_p50_ms') / m('engine', 'tpot_p50_ms'):.2f} |")
    errors = sum(x["errors"] for r in results.values() for mode in MODES for x in r[mode])
    pools = Counter()
    for r in results.values():
        for mode in ("stream", "whole"):
            for x in r[mode]:
                pools.update(x.get("pools", {}))
    lines.append(f"\nfailed requests: {errors}; served by pool: " + ", ".join(f"{p} {n}" for p, n in pools.items()))
    return "\n".join(lines)


def measure(engine, url: str, model: str, maker, concurrencies: list[int], args: argparse.Namespace) -> dict:
    """Warm both sides, then every point: repeats × concurrencies × modes, the modes' order rotated per repeat."""
    warm = [maker.make(args.prompt_tokens) for _ in range(4)]
    engine_point(engine, warm, 4, 4)
    for stream in (True, False):
        service_point(url, model, warm, 4, 4, stream, args.timeout)
    results: dict = {str(c): {m: [] for m in MODES} for c in concurrencies}
    with tqdm(total=args.repeats * len(concurrencies) * len(MODES), unit="point", leave=False) as bar:
        for rep in range(args.repeats):
            order = MODES[rep % 3:] + MODES[:rep % 3]
            for c in concurrencies:
                for mode in order:  # prompts of their own: the service's prefix cache holds the last mode's
                    prompts = [maker.make(args.prompt_tokens) for _ in range(max(8, args.requests_per_slot * c))]
                    bar.set_description(f"repeat {rep + 1} concurrency {c} {mode}")
                    if mode == "engine":
                        res = engine_point(engine, prompts, args.max_tokens, c)
                    else:
                        res = service_point(url, model, prompts, args.max_tokens, c, mode == "stream", args.timeout)
                    results[str(c)][mode].append(res)
                    bar.update(1)
    return results


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml", help="the Serve config whose first app is measured")
    p.add_argument("--concurrency", default="1,4,8,16,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per point = this × concurrency (≥ 8)")
    p.add_argument("--prompt-tokens", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout, seconds")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default="bench_results/throughput.json")
    args = p.parse_args(argv)

    from app.engine.build import build_engine
    from app.serve.config import AppConfig
    from load_tests.client import PromptMaker
    from strategies.loader import Checkpoint

    import_path, app_args, _ = load_app_spec(args.config)
    cfg = AppConfig.model_validate(app_args)
    short = cfg.pools[0]  # short prompts are routed to the first pool that fits them (the header says which)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    maker = PromptMaker(Checkpoint(cfg.model).tokenizer())

    with local_serve(args.port) as url:
        deploy(url, import_path, app_args, "throughput")
        # the same engine as the pool's replicas, with the same cores (threads) as one of its devices
        engine = build_engine(short.engine_options(cfg.model, shared_weights=False), bundle=short.bundle())
        try:
            results = measure(engine, url, cfg.model_name, maker, concurrencies, args)
        finally:
            engine.group.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": args.config, "pool": short.name, "devices": short.devices, "max_num_seqs": short.max_num_seqs,
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "repeats": args.repeats,
            "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"{args.config}: pool {short.name} ({short.devices} device, max_num_seqs {short.max_num_seqs}), prompts of "
          f"{args.prompt_tokens} tokens, {args.max_tokens} output tokens, {args.repeats} repeats (median [min–max])")
    print(format_table(results, concurrencies))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
