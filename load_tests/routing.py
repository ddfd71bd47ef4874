"""``python -m load_tests.routing``: does the router send each request where it finishes first? Measured in one run.

Short prompts of one shape (``--prompt-tokens``, ``--max-tokens`` outputs, EOS ignored, streamed) at each
concurrency go two ways through the same Serve app, in an order rotated every repeat, each way with prompts of its
own: ``auto`` (the router picks the pool for each request, as shipped) and pinned to each of ``--pin``'s pools
(``x-dynpart-pool``: the static choice). Per point: output tokens/s, and per pool that served requests how many, their
first and last token (p50) as measured at the client and as the router predicted them when it chose
(``x-dynpart-predicted-ttft-ms``, ``x-dynpart-predicted-ms``). A router that predicts right and chooses well gives
``auto`` at least the tokens/s of the best pinned way; a pool measured much later than predicted is one it misprices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from app.cli.format import markdown_table, spread
from load_tests.compare import deploy, load_app_spec, local_serve
from load_tests.metrics import RequestRecord


def by_pool(records: list[RequestRecord]) -> dict[str, dict]:
    """Per pool: requests, and the p50 of measured and predicted first and last token, seconds."""
    out = {}
    for pool in sorted({str(r.pool) for r in records}):
        rs = [r for r in records if str(r.pool) == pool]
        p50 = lambda get: statistics.median(get(r) for r in rs)  # noqa: E731
        predicted = [r for r in rs if r.predicted_s is not None]
        guess = lambda get: statistics.median(get(r) for r in predicted) if predicted else None  # noqa: E731
        out[pool] = {"n": len(rs), "ttft_s": p50(lambda r: r.ttft_s), "e2e_s": p50(lambda r: r.latency_s),
                     "predicted_ttft_s": guess(lambda r: r.predicted_ttft_s), "predicted_e2e_s": guess(
                         lambda r: r.predicted_s)}
    return out


def run_point(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, pool: str | None,
              timeout_s: float) -> dict:
    from cost.workloads import Request
    from load_tests.client import run_load

    reqs = [Request(arrival_s=0, prompt_tokens=1, output_tokens=max_tokens) for _ in prompts]
    records, wall = asyncio.run(run_load(url, model, reqs, prompts, concurrency=concurrency, progress=False,
                                         timeout_s=timeout_s, headers={"x-dynpart-pool": pool} if pool else None))
    ok = [r for r in records if r.ok]
    return {"tok_s": sum(r.output_tokens for r in ok) / wall, "errors": len(records) - len(ok), "pools": by_pool(ok)}


def p50_cell(values: list[float | None]) -> str:
    """Per-repeat p50s as ``median [min–max]``; "–" where none was measured (an older server predicts nothing)."""
    known = [v for v in values if v is not None]
    return spread(known, 2) if known else "–"


def format_report(results: dict, ways: list[str], concurrencies: list[int]) -> str:
    rows = []
    for c in concurrencies:
        best = max(ways[1:], key=lambda w: statistics.median(x["tok_s"] for x in results[str(c)][w]))
        for way in ways:
            runs = results[str(c)][way]
            tok = [x["tok_s"] for x in runs]
            ratio = [a["tok_s"] / b["tok_s"] for a, b in zip(runs, results[str(c)][best])]
            pools = sorted({p for x in runs for p in x["pools"]})
            for i, pool in enumerate(pools):
                per = [x["pools"][pool] for x in runs if pool in x["pools"]]
                cell = lambda key: p50_cell([p[key] for p in per])  # noqa: E731
                rows.append([c if way == ways[0] and i == 0 else "", way if i == 0 else "",
                             spread(tok) if i == 0 else "", spread(ratio, 2) if i == 0 and way != best else "",
                             pool, sum(p["n"] for p in per), cell("ttft_s"), cell("predicted_ttft_s"), cell("e2e_s"),
                             cell("predicted_e2e_s")])
    header = ["concurrency", "way", "out tok/s", "/ best pinned", "pool", "requests", "TTFT p50 s", "predicted",
              "E2E p50 s", "predicted"]
    errors = sum(x["errors"] for r in results.values() for w in ways for x in r[w])
    return markdown_table(header, rows) + f"\n\nfailed requests: {errors}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.routing", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml", help="the Serve config whose first app is measured")
    p.add_argument("--concurrency", default="4,16")
    p.add_argument("--pin", default="short", help="pools to pin every request to, each a way of its own (comma list)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests-per-slot", type=int, default=4, help="requests per point = this × concurrency")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout, seconds")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default="bench_results/routing.json")
    args = p.parse_args(argv)

    from app.serve.config import AppConfig
    from load_tests.client import PromptMaker
    from strategies.loader import Checkpoint

    import_path, app_args, _ = load_app_spec(args.config)
    cfg = AppConfig.model_validate(app_args)
    ways = ["auto", *args.pin.split(",")]
    unknown = [w for w in ways[1:] if w not in {pool.name for pool in cfg.pools}]
    if unknown:
        p.error(f"--pin names no pool of {args.config}: {', '.join(unknown)}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    maker = PromptMaker(Checkpoint(cfg.model).tokenizer())
    results: dict = {str(c): {w: [] for w in ways} for c in concurrencies}
    with local_serve(args.port) as url:
        deploy(url, import_path, app_args, "routing")
        for way in ways:  # warm: every pool has run the shape once
            run_point(url, cfg.model_name, [maker.make(args.prompt_tokens) for _ in range(4)], 4, 4,
                      None if way == "auto" else way, args.timeout)
        with tqdm(total=args.repeats * len(concurrencies) * len(ways), unit="point", leave=False) as bar:
            for rep in range(args.repeats):
                order = ways[rep % len(ways):] + ways[:rep % len(ways)]
                for c in concurrencies:
                    for way in order:
                        bar.set_description(f"repeat {rep + 1} concurrency {c} {way}")
                        prompts = [maker.make(args.prompt_tokens) for _ in range(args.requests_per_slot * c)]
                        results[str(c)][way].append(run_point(url, cfg.model_name, prompts, args.max_tokens, c,
                                                              None if way == "auto" else way, args.timeout))
                        bar.update(1)
    meta = {"config": args.config, "ways": ways, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"{args.config}: prompts of {args.prompt_tokens} tokens, {args.max_tokens} output tokens, streamed, "
          f"{args.requests_per_slot} requests per unit of concurrency, {args.repeats} repeats (median [min–max])")
    print(format_report(results, ways, concurrencies))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
