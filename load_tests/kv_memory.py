"""``python -m load_tests.kv_memory``: what the paged KV cache, chunked prefill and prefix caching buy, measured on the
in-process engine (the shipped short pool's options: SmolLM2, one device, one core), each against its baseline in the
same run, repeats in rotated order:

- ``capacity``: sequences one replica holds at once under a fixed KV budget: paged blocks against the slot cache it
  replaced (one ``max_model_len`` slot per sequence, reserved up front), for short chat requests;
- ``batching``: decode output tok/s at batch 1, 4, 16, 32, as a ratio to batch 1;
- ``chunked``: TPOT (p50/p90 of the gaps between tokens) of short streams while long prompts arrive, with and
  without chunked prefill, and what chunking costs the long prompts' TTFT;
- ``prefix``: TTFT of a request whose long prefix is cached, against the same request with nothing cached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.cli.format import markdown_table, spread
from load_tests.compare import load_app_spec

PARTS = ("capacity", "batching", "chunked", "prefix")


def build(config: str, pool: str | None = None, pin: bool = False, **override):
    """An engine with the options of the config's ``pool`` (default its first; ``override`` changes some), on this
    process's cores; ``pin``: its devices claim cores as the pool's replica would (``build_engine``'s ``pin_here``)."""
    from app.engine.build import build_engine
    from app.serve.config import AppConfig

    cfg = AppConfig.model_validate(load_app_spec(config)[1])
    chosen = next((p for p in cfg.pools if p.name == pool), None) if pool else cfg.pools[0]
    if chosen is None:
        raise ValueError(f"{config} has no pool {pool!r}")
    pool = chosen.model_copy(update=override)
    opts = pool.engine_options(cfg.model, shared_weights=False)
    return build_engine(opts, bundle=pool.bundle(), pin_here=pin), pool


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def params(max_tokens: int):
    from app.engine.params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


# -- capacity --------------------------------------------------------------------------------------------------------

def capacity(config: str, requests: int, prompt: int, output: int) -> dict:
    """Add ``requests`` chat-sized requests at once and step until admissions stop: how many run together."""
    engine, pool = build(config, max_num_seqs=4096)
    try:
        seqs = [engine.add(random_ids(prompt, i), params(output)) for i in range(requests)]
        most, still = 0, 0
        while still < 3 and engine.has_work():  # three steps with no new admission: the cache is full
            engine.step()
            still = still + 1 if len(engine.running) <= most else 0
            most = max(most, len(engine.running))
        token_bytes = engine.group.call("kv_block_bytes") / engine.blocks.block_size
        budget = engine.blocks.num_blocks * engine.group.call("kv_block_bytes")
        slots = int(budget // (pool.max_model_len * token_bytes))
        del seqs
        return {"budget_gb": budget / 1e9, "blocks": engine.blocks.num_blocks, "paged": most, "slots": slots,
                "prompt": prompt, "output": output, "max_model_len": pool.max_model_len}
    finally:
        engine.group.shutdown()


# -- batching --------------------------------------------------------------------------------------------------------

def decode_rate(engine, batch: int, prompt: int, output: int, seed: int) -> float:
    """Output tok/s of ``batch`` sequences decoding together (from all first tokens to the last token)."""
    seqs = [engine.add(random_ids(prompt, seed * 1000 + i), params(output)) for i in range(batch)]
    while not all(s.output_ids for s in seqs):
        engine.step()
    t0, n0 = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    while engine.has_work():
        engine.step()
    return (sum(len(s.output_ids) for s in seqs) - n0) / (time.perf_counter() - t0)


def batching(config: str, batches: list[int], repeats: int, prompt: int, output: int) -> dict:
    engine, _ = build(config, max_num_seqs=max(batches), enable_prefix_caching=False)
    rates: dict[int, list[float]] = {b: [] for b in batches}
    try:
        decode_rate(engine, 2, prompt, 4, seed=99)  # warm-up
        for r in tqdm(range(repeats), desc="batching", unit="repeat"):
            for b in batches[r % len(batches):] + batches[:r % len(batches)]:
                rates[b].append(decode_rate(engine, b, prompt, output, seed=r))
    finally:
        engine.group.shutdown()
    return {"rates": rates, "prompt": prompt, "output": output}


# -- chunked prefill -------------------------------------------------------------------------------------------------

def interference(engine, streams: int, long_prompts: int, long_len: int, every_s: float, seed: int,
                 stream_tokens: int = 160) -> dict:
    """``streams`` short streams decode; a long prompt arrives every ``every_s`` seconds. Gaps between the streams'
    tokens (what their users see as TPOT) and the long prompts' TTFT."""
    short = [engine.add(random_ids(32, seed * 100 + i), params(stream_tokens)) for i in range(streams)]
    while not all(s.output_ids for s in short):
        engine.step()
    seen = {s.id: (len(s.output_ids), time.perf_counter()) for s in short}
    gaps, longs, t0 = [], [], time.perf_counter()
    while any(not s.finished for s in short):
        while len(longs) < long_prompts and time.perf_counter() >= t0 + len(longs) * every_s:
            due = t0 + len(longs) * every_s  # it arrived then, even if a long step kept the loop from seeing it
            longs.append(engine.add(random_ids(long_len, seed * 100 + 50 + len(longs)), params(4)))
            longs[-1].t_arrival = due
        engine.step()
        now = time.perf_counter()
        for s in short:
            n, at = seen[s.id]
            if len(s.output_ids) > n and not s.finished:
                gaps.append((now - at) / (len(s.output_ids) - n))
                seen[s.id] = (len(s.output_ids), now)
    while engine.has_work():
        engine.step()
    return {"tpot_p50_ms": float(np.percentile(gaps, 50)) * 1e3, "tpot_p90_ms": float(np.percentile(gaps, 90)) * 1e3,
            "tpot_max_ms": max(gaps) * 1e3, "long_ttft_ms": statistics.fmean(s.ttft_s for s in longs) * 1e3,
            "longs": len(longs)}


def chunked(config: str, repeats: int, streams: int, long_len: int, every_s: float, budgets: list[int]) -> dict:
    """Whole prompts against chunks of each token budget (the step's decode tokens included)."""
    modes = {"whole": None, **{f"chunks of {b}": b for b in budgets}}
    engines = {m: build(config, enable_chunked_prefill=b is not None, enable_prefix_caching=False,
                        **({"max_num_batched_tokens": b} if b else {}))[0] for m, b in modes.items()}
    out: dict[str, list[dict]] = {m: [] for m in modes}
    names = list(modes)
    try:
        for r in tqdm(range(repeats), desc="chunked", unit="repeat"):
            for m in names[r % len(names):] + names[:r % len(names)]:
                out[m].append(interference(engines[m], streams, 4, long_len, every_s, seed=r))
    finally:
        for e in engines.values():
            e.group.shutdown()
    return {"runs": out, "streams": streams, "long_len": long_len, "every_s": every_s}


# -- prefix caching --------------------------------------------------------------------------------------------------

def ttft(engine, ids: list[int]) -> tuple[float, int]:
    seq = engine.add(ids, params(1))
    while not seq.finished:
        engine.step()
    return seq.ttft_s, seq.cached_tokens


def prefix(config: str, repeats: int, prefix_len: int, tail: int) -> dict:
    engine, _ = build(config)
    out = {"uncached": [], "cached": []}
    hit = []
    try:
        ttft(engine, random_ids(64, 7))  # warm-up
        for r in tqdm(range(repeats), desc="prefix", unit="repeat"):
            shared = random_ids(prefix_len, 1000 + r)
            for m in (["uncached", "cached"] if r % 2 == 0 else ["cached", "uncached"]):
                if m == "uncached":  # a prefix never seen: everything computed
                    t, _ = ttft(engine, random_ids(prefix_len, 2000 + r) + random_ids(tail, 3000 + r))
                else:  # the prefix computed once by another request, then a new tail after it
                    ttft(engine, shared + random_ids(tail, 4000 + r))
                    t, cached = ttft(engine, shared + random_ids(tail, 5000 + r))
                    hit.append(cached)
                out[m].append(t)
    finally:
        engine.group.shutdown()
    return {"ttft_s": out, "cached_tokens": hit, "prefix": prefix_len, "tail": tail}


# -- report ----------------------------------------------------------------------------------------------------------

def save(res: dict, path: str, report: Callable[[dict], str]) -> None:
    """The raw results to ``path`` (JSON), the report to stdout."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(report(res))


def report(res: dict) -> str:
    lines = []
    if "capacity" in res:
        c = res["capacity"]
        lines += [f"Sequences held at once, KV budget {c['budget_gb']:.2f} GB ({c['blocks']} blocks), requests of "
                  f"{c['prompt']} + {c['output']} tokens, max_model_len {c['max_model_len']}:", "",
                  markdown_table(["KV cache", "sequences at once", "ratio"],
                                 [["slots (max_model_len each)", c["slots"], "1.00"],
                                  ["paged (16-token blocks)", c["paged"], f"{c['paged'] / max(1, c['slots']):.2f}"]]),
                  ""]
    if "batching" in res:
        b = res["batching"]
        base = statistics.median(b["rates"][min(b["rates"])])
        lines += [f"Decode out tok/s by batch (prompts {b['prompt']}, {b['output']} tokens), median [min–max]:", "",
                  markdown_table(["batch", "out tok/s", "ratio to batch 1"],
                                 [[k, spread(v), f"{statistics.median(v) / base:.2f}"]
                                  for k, v in sorted(b["rates"].items())]), ""]
    if "chunked" in res:
        c = res["chunked"]
        rows = []
        for m, runs in c["runs"].items():
            rows.append([m, spread([x["tpot_p50_ms"] for x in runs], 0),
                         spread([x["tpot_p90_ms"] for x in runs], 0),
                         spread([x["tpot_max_ms"] for x in runs], 0),
                         spread([x["long_ttft_ms"] for x in runs], 0)])
        lines += [f"{c['streams']} short streams while a {c['long_len']}-token prompt arrives every {c['every_s']} s "
                  "(4 of them), ms, median [min–max]:", "",
                  markdown_table(["prefill", "stream TPOT p50", "stream TPOT p90", "stream worst gap",
                                  "long prompt TTFT"], rows), ""]
    if "prefix" in res:
        p = res["prefix"]
        un, ca = (statistics.median(p["ttft_s"][k]) for k in ("uncached", "cached"))
        lines += [f"TTFT of a {p['prefix']}-token prefix + {p['tail']} new tokens (cached tokens found: "
                  f"{sorted(set(p['cached_tokens']))}), ms, median [min–max]:", "",
                  markdown_table(["prefix", "TTFT ms", "ratio"],
                                 [["uncached", spread([t * 1e3 for t in p["ttft_s"]["uncached"]], 0), "1.00"],
                                  ["cached", spread([t * 1e3 for t in p["ttft_s"]["cached"]], 0),
                                   f"{ca / un:.2f}"]]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.kv_memory", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_results/kv_memory.json")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}: use {', '.join(PARTS)}")
    res: dict = {"config": args.config, "date": time.strftime("%Y-%m-%d %H:%M")}
    if "capacity" in parts:
        res["capacity"] = capacity(args.config, requests=400, prompt=32, output=32)
    if "batching" in parts:
        res["batching"] = batching(args.config, [1, 4, 16, 32], args.repeats, prompt=64, output=32)
    if "chunked" in parts:
        res["chunked"] = chunked(args.config, args.repeats, streams=4, long_len=900, every_s=4.0,
                                 budgets=[512, 256, 64])
    if "prefix" in parts:
        res["prefix"] = prefix(args.config, args.repeats, prefix_len=768, tail=16)
    save(res, args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
