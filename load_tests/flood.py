"""``python -m load_tests.flood``: many requests at once against the shipped app; does each get an answer in time?

``--requests`` non-streaming completions (``--max-tokens`` each, EOS ignored) are sent at the same instant, each
with the client's patience ``--timeout``. A service that admits only what it can finish answers every one of them
200 or 503 (with ``retry-after``) before that, and stays healthy. Prints the counts, the latency of the served and
of the refused, and whether the service answers afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from load_tests.compare import deploy, load_app_spec, local_serve


async def flood(url: str, model: str, prompts: list[str], max_tokens: int, timeout_s: float) -> list[dict]:
    async def one(c: httpx.AsyncClient, prompt: str) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        try:
            r = await c.post("/v1/completions", json=body)
            return {"status": r.status_code, "s": time.perf_counter() - t0,
                    "retry_after": r.headers.get("retry-after"), "pool": r.headers.get("x-dynpart-pool")}
        except httpx.TimeoutException:
            return {"status": "timeout", "s": time.perf_counter() - t0}
        except httpx.HTTPError as e:
            return {"status": type(e).__name__, "s": time.perf_counter() - t0}

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as c:
        return await asyncio.gather(*(one(c, p) for p in prompts))


def summary(results: list[dict], timeout_s: float) -> str:
    counts = Counter(str(r["status"]) for r in results)
    lines = [f"{len(results)} requests at once, client timeout {timeout_s:g} s: "
             + ", ".join(f"{n} × {s}" for s, n in sorted(counts.items()))]
    for status in ("200", "503"):
        t = [r["s"] for r in results if str(r["status"]) == status]
        if t:
            lines.append(f"  {status}: latency p50 {np.percentile(t, 50):.1f} s, p90 {np.percentile(t, 90):.1f} s, "
                         f"max {max(t):.1f} s")
    pools = Counter(r.get("pool") for r in results if r["status"] == 200)
    if pools:
        lines.append("  served by pool: " + ", ".join(f"{p} {n}" for p, n in pools.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.flood", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--prompt-tokens", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=180.0, help="the client's patience per request, seconds")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default="bench_results/flood.json")
    args = p.parse_args(argv)

    from app.serve.config import AppConfig
    from load_tests.client import PromptMaker
    from strategies.loader import Checkpoint

    import_path, app_args, _ = load_app_spec(args.config)
    cfg = AppConfig.model_validate(app_args)
    maker = PromptMaker(Checkpoint(cfg.model).tokenizer())
    prompts = [maker.make(args.prompt_tokens) for _ in range(args.requests)]
    with local_serve(args.port) as url:
        deploy(url, import_path, app_args, "flood")
        t0 = time.perf_counter()
        results = asyncio.run(flood(url, cfg.model_name, prompts, args.max_tokens, args.timeout))
        wall = time.perf_counter() - t0
        after = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": cfg.model_name, "prompt": "Hi",
                                                                       "max_tokens": 4}).status_code
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "wall_s": wall, "after": after, "results": results}, indent=1))
    print(summary(results, args.timeout))
    served = sum(r["status"] == 200 for r in results)
    print(f"  wall {wall:.1f} s, {served * args.max_tokens / wall:.1f} output tok/s served; "
          f"a request afterwards: {after}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
