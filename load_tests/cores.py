"""``python -m load_tests.cores``: what pinning each device to its cores buys, on one warm ``dynpart serve``.

Starts ``dynpart serve CONFIG`` (the shipped config: ``short`` a whole core, ``long`` two ranks sharing the other)
with ``DYNPART_STEP_TRACE`` on, then alternates two arms on the same warm service, ``--rounds`` times in rotated
order: **pinned** (as ``dynpart serve`` and the devices set it up: placement/cores.py) and **unpinned** (every process
of the service allowed on every core at normal priority, as the OS would have it). Cores and priorities are set on
every thread of every process under the server. In each arm, first the latency of a ``--long-tokens``-token prompt
alone on ``long`` (one output token, ``short`` idle: pinned, ``long`` no longer borrows ``short``'s idle core); then
``--busy-long`` clients keep ``long`` busy with such prompts (``x-dynpart-pool: long``) while ``--concurrency``
clients send ``--requests`` requests of ``--prompt-tokens`` / ``--max-tokens`` (whole answers, EOS ignored), which
the router sends to ``short`` (mostly). Per arm: their output tok/s, ``short``'s steps' median forward ms by shape
(from the step trace: 4 decode rows; 3 and a new prompt's 16-token chunk) and the ``long`` requests finished
meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import yaml

from app.cli.format import markdown_table
from load_tests.compare import rotated

ARMS = ("pinned", "unpinned")


Placement = dict[int, tuple[set[int], int]]  # pid -> (its cores, its nice)


def set_placement(root: int, placement: Placement | None) -> Placement:
    """Every thread of every process under ``root`` to its cores and priority (``None``: every core, normal
    priority: as the OS would place them); returns the placement as it was."""
    everything = set(range(os.cpu_count() or 1))
    before: Placement = {}
    for p in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        try:
            before[p.pid] = (set(p.cpu_affinity()), p.nice())
            cores, nice = (everything, 0) if placement is None else placement.get(p.pid, before[p.pid])
            for t in p.threads():
                os.sched_setaffinity(t.id, cores)
                os.setpriority(os.PRIO_PROCESS, t.id, nice)
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue
    return before


def busy_long(url: str, model: str, tokens: int, stop: threading.Event, done: list[int]) -> None:
    while not stop.is_set():
        body = {"model": model, "prompt": "word " * tokens + str(time.time()), "max_tokens": 16, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"x-dynpart-pool": "long"}, timeout=600)
        done.append(r.status_code)


def long_alone_s(url: str, model: str, tokens: int, n: int = 3) -> float:
    """Median seconds of ``n`` ``tokens``-token prompts (one output token) on ``long`` with ``short`` idle: what
    pinning costs ``long`` (it no longer borrows ``short``'s idle core)."""
    took = []
    for i in range(n):
        body = {"model": model, "prompt": f"{i} {time.time()} " + "word " * tokens, "max_tokens": 1}
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"x-dynpart-pool": "long"}, timeout=600)
        r.raise_for_status()
        took.append(time.perf_counter() - t0)
    return statistics.median(took)


def short_load(url: str, model: str, maker, args: argparse.Namespace) -> float:
    from cost.workloads import Request
    from load_tests.client import run_load

    reqs = [Request(arrival_s=0, prompt_tokens=args.prompt_tokens, output_tokens=args.max_tokens)] * args.requests
    prompts = [maker.make(args.prompt_tokens) for _ in reqs]
    records, wall = asyncio.run(run_load(url, model, reqs, prompts, concurrency=args.concurrency, progress=False,
                                         stream=False))
    bad = [r for r in records if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0].error}")
    return sum(r.output_tokens for r in records) / wall


def step_medians(trace: Path, pid: int) -> dict[str, float]:
    """The median forward ms of ``pid``'s steps by shape, from the step trace."""
    shapes = collections.defaultdict(list)
    for line in trace.read_text().splitlines():
        step = json.loads(line)
        if step["pid"] == pid:
            tokens = sorted(t for _, seqs in step["passes"] for t in seqs)
            shapes[tuple(tokens)].append(step["forward_ms"])
    named = {"4 rows": (1, 1, 1, 1), "3 rows + 16": (1, 1, 1, 16)}  # a decode step; one with a new prompt's chunk
    return {name: statistics.median(shapes[key]) if shapes[key] else float("nan") for name, key in named.items()}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.cores", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--busy-long", type=int, default=2, help="clients keeping the long pool busy (0: long idle)")
    p.add_argument("--long-tokens", type=int, default=600)
    p.add_argument("--out", default="bench_results/cores.json")
    args = p.parse_args(argv)

    from app.cli.demo import serve_run
    from app.serve.config import AppConfig
    from load_tests.client import PromptMaker
    from strategies.loader import Checkpoint

    spec = yaml.safe_load(Path(args.config).read_text())
    app_args = spec["applications"][0]["args"]
    model = app_args.get("served_model_name") or app_args["model"]
    port = spec.get("http_options", {}).get("port", 8000)
    url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="dynpart-cores-bench-"))
    trace = work / "steps.jsonl"
    os.environ["DYNPART_STEP_TRACE"] = str(trace)  # the server's engines inherit it
    maker = PromptMaker(Checkpoint(AppConfig.model_validate(app_args).model).tokenizer(), seed=11)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with serve_run(args.config, url, work / "serve.log", timeout_s=600) as server:
        short = next(q for q in psutil.Process(server.pid).children(recursive=True)
                     if "ServeReplica:dynpart:short" in " ".join(q.cmdline()))
        pinned = set_placement(server.pid, None)  # as dynpart serve set them up; now unpinned
        short_load(url, model, maker, argparse.Namespace(**{**vars(args), "requests": 4}))  # warm
        for r in range(args.rounds):
            for arm in rotated(list(ARMS), r):
                set_placement(server.pid, pinned if arm == "pinned" else None)
                alone = long_alone_s(url, model, args.long_tokens)
                stop, done = threading.Event(), []
                clients = [threading.Thread(target=busy_long, args=(url, model, args.long_tokens, stop, done),
                                            daemon=True) for _ in range(args.busy_long)]
                for c in clients:
                    c.start()
                time.sleep(3 if clients else 0)
                trace.write_text("")
                tok_s = short_load(url, model, maker, args)
                steps = step_medians(trace, short.pid)
                stop.set()
                for c in clients:
                    c.join()
                results[arm].append({"tok_s": tok_s, **steps, "long_done": len(done), "long_alone_s": alone})
                print(f"round {r + 1} {arm}: short {tok_s:.1f} tok/s, steps {steps}, long requests {len(done)}, "
                      f"a long prompt alone {alone:.2f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    rows = [[arm, *(", ".join(f"{x[k]:.1f}" for x in results[arm]) for k in ("tok_s", "4 rows", "3 rows + 16")),
             ", ".join(str(x["long_done"]) for x in results[arm]),
             ", ".join(f"{x['long_alone_s']:.2f}" for x in results[arm])] for arm in ARMS]
    print(markdown_table(["arm", "c=4 out tok/s", "short 4-row step ms", "short 3 rows + 16 ms", "long requests done",
                          "long prompt alone s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
