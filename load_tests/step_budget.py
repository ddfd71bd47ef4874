"""``python -m load_tests.step_budget``: fixed step budgets against the one sized by the TPOT target (issue 27).

Short streams decode on the in-process engine (SmolLM2, the shipped pools' options: ``short``, one device, and
``long``, two) while long prompts arrive one after another (each when the one before has its first token). Every
mode runs on the same engine (one per pool, built with the largest cap, so the same KV cache, layouts and learned
correction): fixed ``max_num_batched_tokens`` of each size, and ``slo`` (``app/engine/step_budget.py``: each step's
prefill sized by the pool's ``slo.tpot_s``, capped at the largest budget). Measured per run: the gaps between the
streams' tokens while the long prompts are read (worst, p99, p50), each long prompt's TTFT, and the requests that met
their SLO (a stream: worst gap within 1.5x ``tpot_s``; a long prompt: TTFT within 2x its TTFT alone on the engine,
measured once per pool, in chunks of the largest budget, no streams); for ``slo`` the planner time spent sizing each
chunk. Modes rotate over repeats; the report gives median [min–max] over repeats. The devices claim cores as the
pool's replica would (``--unpinned``: not), so ``long``'s two ranks share one core, as served.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from tqdm import tqdm

from app.cli.format import markdown_table, spread
from load_tests.kv_memory import build, params, random_ids, save

SLO_GAP = 1.5  # a stream meets its SLO with every gap within this many times the pool's tpot_s
SLO_TTFT = 2.0  # a long prompt meets its SLO with TTFT within this many times its TTFT alone


def use_budget(engine, mode: str, cap: int) -> None:
    """``mode``: "slo" (sized by the TPOT target, capped at ``cap``), or a fixed budget's token count."""
    sched = engine.scheduler
    sched.config = dataclasses.replace(sched.config, max_num_batched_tokens=cap if mode == "slo" else int(mode))
    sched.sizer = engine.step_budget if mode == "slo" else None


def step_until(engine, done) -> None:
    while not done():
        engine.step()


def alone(engine, sizes: list[int], cap: int) -> dict[int, float]:
    """TTFT of each long prompt alone on the engine, in chunks of the largest budget, no streams."""
    use_budget(engine, str(cap), cap)
    out = {}
    for n in sizes:
        seq = engine.add(random_ids(n, 77 + n), params(1))
        step_until(engine, lambda: seq.finished)
        out[n] = seq.ttft_s
    return out


def run(engine, mode: str, cap: int, streams: int, sizes: list[int], seed: int) -> dict:
    """One run: ``streams`` decode; the long prompts arrive in turn; the streams' gaps while they are read."""
    use_budget(engine, mode, cap)
    short = [engine.add(random_ids(32, seed * 100 + i), params(1500)) for i in range(streams)]
    step_until(engine, lambda: all(s.output_ids for s in short))
    seen = {s.id: (len(s.output_ids), time.perf_counter()) for s in short}
    gaps: dict[int, list[float]] = {s.id: [] for s in short}
    longs = []
    budget = engine.step_budget
    sized, sizing_s, steps, t0 = budget.sized, budget.sizing_s, 0, time.perf_counter()
    for i, n in enumerate(sizes):
        longs.append(engine.add(random_ids(n, seed * 100 + 50 + i), params(4)))
        while not longs[-1].output_ids:
            engine.step()
            steps += 1
            now = time.perf_counter()
            for s in short:
                k, at = seen[s.id]
                if len(s.output_ids) > k:
                    gaps[s.id].append((now - at) / (len(s.output_ids) - k))
                    seen[s.id] = (len(s.output_ids), now)
    took = time.perf_counter() - t0
    for s in short:
        assert not s.finished, "a stream finished while long prompts were read: raise its max_tokens"
        engine.abort(s)
    step_until(engine, lambda: not engine.has_work())
    return {"gaps_ms": [g * 1e3 for gs in gaps.values() for g in gs],
            "stream_worst_ms": [max(gs) * 1e3 for gs in gaps.values()],
            "ttft_ms": {n: s.ttft_s * 1e3 for n, s in zip(sizes, longs)}, "steps": steps, "took_s": took,
            "sized": budget.sized - sized, "sizing_ms": (budget.sizing_s - sizing_s) * 1e3}


def pool_runs(config: str, pool: str, modes: list[str], repeats: int, streams: int, sizes: list[int],
              max_model_len: int, pin: bool = False) -> dict:
    cap = max(int(m) for m in modes if m != "slo")
    engine, cfg = build(config, pool=pool, pin=pin, max_num_batched_tokens=cap, max_model_len=max_model_len,
                        enable_prefix_caching=False, max_num_seqs=16)
    try:
        assert engine.step_budget is not None, f"pool {pool!r} has no TPOT target (slo.tpot_s)"
        engine.generate([random_ids(64, 5)], params(8))  # warm-up: first-use buffers, the correction's first steps
        base = alone(engine, sizes, cap)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in tqdm(range(repeats), desc=pool, unit="repeat"):
            for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                runs[m].append(run(engine, m, cap, streams, sizes, seed=r))
    finally:
        engine.group.shutdown()
    return {"pool": pool, "devices": cfg.devices, "tpot_s": engine.step_budget.tpot_s, "cap": cap,
            "alone_ttft_ms": {n: t * 1e3 for n, t in base.items()}, "runs": runs}


def summary(res: dict, streams: int) -> list[list[str]]:
    """Rows per mode: gaps (p50, p99, worst), worst / tpot_s, each long prompt's TTFT, SLO met, sizing cost."""
    tpot_ms, rows = res["tpot_s"] * 1e3, []
    sizes = list(res["alone_ttft_ms"])
    for m, runs in res["runs"].items():
        worst = [max(x["gaps_ms"]) for x in runs]
        met = []
        for x in runs:
            ok_long = sum(x["ttft_ms"][n] <= SLO_TTFT * res["alone_ttft_ms"][n] for n in sizes)
            ok_streams = sum(w <= SLO_GAP * tpot_ms for w in x["stream_worst_ms"])
            met.append(ok_long + ok_streams)
        rows.append([f"slo ({tpot_ms:.0f} ms)" if m == "slo" else f"fixed {m}",
                     spread([float(np.percentile(x["gaps_ms"], 50)) for x in runs], 0),
                     spread([float(np.percentile(x["gaps_ms"], 99)) for x in runs], 0),
                     spread(worst, 0), f"{np.median(worst) / tpot_ms:.2f}",
                     *(spread([x["ttft_ms"][n] for x in runs], 0) for n in sizes),
                     f"{np.median(met):.0f}/{streams + len(sizes)}",
                     (spread([x["sizing_ms"] / max(1, x["sized"]) for x in runs], 2) if m == "slo" else "–")])
    return rows


def report(res: dict) -> str:
    lines = []
    for p in res["pools"]:
        sizes = list(p["alone_ttft_ms"])
        alone_txt = ", ".join(f"{n}: {t:.0f}" for n, t in p["alone_ttft_ms"].items())
        lines += [f"Pool {p['pool']!r} ({p['devices']} device(s), tpot_s {p['tpot_s']}, cap {p['cap']}): "
                  f"{res['streams']} streams while prompts of {', '.join(map(str, sizes))} tokens arrive in turn; "
                  f"ms, median [min–max] over {res['repeats']} repeats; TTFT alone (no streams): "
                  f"{alone_txt}", "",
                  markdown_table(["budget", "gap p50", "gap p99", "worst gap", "worst / tpot",
                                  *(f"TTFT {n}" for n in sizes), "SLO met", "sizing ms/chunk"],
                                 summary(p, res["streams"])), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.step_budget", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--pools", default="short,long")
    p.add_argument("--budgets", default="64,256,1024,2048", help="fixed budgets; the largest caps the slo mode")
    p.add_argument("--sizes", default="1000,2000,4000", help="long prompts' tokens, arriving in turn")
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_results/step_budget.json")
    p.add_argument("--unpinned", action="store_true",
                   help="leave the devices unpinned (before 2026-12-06 the default: a 2-rank pool of half a core "
                        "each then computed on both cores here, faster than it is priced and than it runs served)")
    args = p.parse_args(argv)
    modes = ["slo", *args.budgets.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    res: dict = {"config": args.config, "date": time.strftime("%Y-%m-%d %H:%M"), "streams": args.streams,
                 "repeats": args.repeats, "pools": []}
    for pool in args.pools.split(","):
        res["pools"].append(pool_runs(args.config, pool, modes, args.repeats, args.streams, sizes,
                                      args.max_model_len, pin=not args.unpinned))
        print(report({**res, "pools": res["pools"][-1:]}), flush=True)
    save(res, args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
