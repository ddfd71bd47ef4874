"""``python -m load_tests.token_order``: balanced (zigzag) token shards against contiguous ones, measured in one run.

Under a causal mask the last of p contiguous token shards scores (2p−1)/p² of the attention pairs, so it finishes
last and the others wait for it at every layer's collective; the zigzag (rank r holds chunks r and 2p−1−r of 2p)
gives every rank 1/p. Two groups of ``--devices`` shard workers hold the model, one sharding each way; each
token-sharded strategy prefills each length on both, ``--repeats`` times in rotated order. Prints the median seconds
[min–max] and contiguous/zigzag ratios of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from load_tests.engine_runs import random_prompt, runner_kwargs, whole
from app.cli.format import markdown_table, spread
from placement.calibrate import timed

ORDERS = {"zigzag": True, "contiguous": False}
STRATEGIES = ("projection_replicated", "weight_gathered")


def measure(model: str, devices: int, lengths: list[int], repeats: int) -> dict:
    from placement.workers import start_group
    from strategies.loader import Checkpoint

    vocab = Checkpoint(model).shape.vocab_size
    groups = {name: start_group(devices, {**runner_kwargs(model, devices, capacity=max(lengths) + 8, seqs=1),
                                          "balanced": balanced})
              for name, balanced in ORDERS.items()}
    times: dict[str, dict[str, dict[int, list[float]]]] = {
        s: {o: {n: [] for n in lengths} for o in ORDERS} for s in STRATEGIES}
    try:
        for g in groups.values():  # first use builds gather buffers and replicas
            for s in STRATEGIES:
                g.call("forward", [whole(random_prompt(16, vocab))], s)
        runs = [(s, n) for s in STRATEGIES for n in lengths]
        for r in tqdm(range(repeats), desc="repeats"):
            for s, n in runs:
                ids = random_prompt(n, vocab, seed=r)
                order = list(ORDERS) if r % 2 == 0 else list(ORDERS)[::-1]
                for o in order:
                    times[s][o][n].append(timed(lambda: groups[o].call("forward", [whole(ids)], s)))
    finally:
        for g in groups.values():
            g.shutdown()
    return {"model": model, "devices": devices, "repeats": repeats, "times": times,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def report(res: dict) -> str:
    rows = []
    for s, by_order in res["times"].items():
        for n in by_order["zigzag"]:
            z, c = by_order["zigzag"][n], by_order["contiguous"][n]
            rows.append([s, n, spread(c, 2), spread(z, 2), f"{statistics.median(c) / statistics.median(z):.2f}"])
    return markdown_table(["strategy", "tokens", "contiguous s", "zigzag s", "contiguous / zigzag"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.token_order", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_results/token_order.json")
    args = p.parse_args(argv)
    res = measure(args.model, args.devices, [int(x) for x in args.lengths.split(",")], args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
