"""``python -m load_tests.run``: one workload against a running dynpart (or any OpenAI-compatible) server.

Prints a summary table and writes ``<out>/<label>.json`` (summary, per pool, per strategy, every request),
``<out>/<label>.csv`` (one row per request) and ``<out>/<label>.vllm.json`` (what ``vllm bench serve --save-result``
writes, goodput for the ``--slo-*`` given: ``load_tests.vllm_json``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
from pathlib import Path

from load_tests.metrics import SLO, RequestRecord, Summary, summarize, summarize_by
from load_tests.vllm_json import vllm_bench_result
from strategies.shapes import DEFAULT_MODEL


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name sent, and whose tokenizer builds the prompts")
    p.add_argument("--workload", default="mixture", help="short-chat, long-document, mixture, length-sweep or CSV")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals, req/s (inf: all at once)")
    p.add_argument("--concurrency", type=int, default=None, help="fixed number of requests in flight instead")
    p.add_argument("--duration", type=float, default=None, help="stop issuing after this many seconds")
    p.add_argument("--scale", type=float, default=1.0, help="multiply prompt and output lengths (CPU: 0.1-0.25)")
    p.add_argument("--max-context", type=int, default=2048, help="server's prompt + output limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2e-ms", type=float, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--out", default="load_results")


def build_requests(args: argparse.Namespace):
    """The workload's (prompt, output) lengths, scaled to this server, and prompts of exactly those lengths."""
    from load_tests.client import PromptMaker
    from cost.workloads import workload
    from strategies.loader import Checkpoint

    reqs = workload(args.workload, requests=args.num_requests, rate=args.rate if args.rate not in (None, float("inf"))
                    else None, seed=args.seed, context=int(args.max_context / max(args.scale, 1e-9)))
    reqs = [r.model_copy(update={"prompt_tokens": max(1, int(r.prompt_tokens * args.scale)),
                                 "output_tokens": max(2, int(r.output_tokens * args.scale))})
            for r in reqs[: args.num_requests]]
    maker = PromptMaker(Checkpoint(args.model).tokenizer(), seed=args.seed)
    return reqs, [maker.make(r.prompt_tokens) for r in reqs]


def slo_of(args: argparse.Namespace) -> SLO | None:
    if args.slo_ttft_ms is None and args.slo_tpot_ms is None and args.slo_e2e_ms is None:
        return None
    return SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, e2e_ms=args.slo_e2e_ms)


def write_results(out: Path, label: str, records: list[RequestRecord], duration: float, slo: SLO | None,
                  model: str = "", request_rate: float | None = None, max_concurrency: int | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    vllm = vllm_bench_result(records, duration, slo, model=model, request_rate=request_rate,
                             max_concurrency=max_concurrency)
    (out / f"{label}.vllm.json").write_text(json.dumps(vllm))
    result = {
        "label": label,
        "summary": summarize(records, duration, slo).model_dump(),
        "by_pool": {k: v.model_dump() for k, v in summarize_by(records, "pool", duration, slo).items()},
        "by_strategy": {k: v.model_dump() for k, v in summarize_by(records, "strategy", duration, slo).items()},
        "slo": slo.model_dump() if slo else None,
        "records": [r.model_dump() for r in records],
    }
    (out / f"{label}.json").write_text(json.dumps(result, indent=1))
    with open(out / f"{label}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_tokens", "output_tokens", "ok", "error", "pool", "strategy", "ttft_ms", "tpot_ms",
                    "e2e_ms"])
        for r in records:
            w.writerow([r.prompt_tokens, r.output_tokens, r.ok, r.error or "", r.pool or "", r.strategy or "",
                        f"{r.ttft_s * 1e3:.2f}" if r.ok else "", f"{r.tpot_s * 1e3:.2f}" if r.ok and r.tpot_s else "",
                        f"{r.latency_s * 1e3:.2f}" if r.ok else ""])
    return result


def format_summary(label: str, s: Summary) -> str:
    def stat(x):
        return "-" if x is None else f"{x.mean:9.1f} {x.p50:9.1f} {x.p90:9.1f} {x.p99:9.1f}"

    lines = [f"== {label}: {s.completed} ok, {s.failed} failed {s.errors or ''} in {s.duration_s:.1f} s",
             f"   throughput {s.request_throughput:.3f} req/s, {s.output_throughput:.1f} tok/s"
             + ("" if s.goodput is None else f", goodput {s.goodput:.3f} req/s"),
             f"   {'ms':<6}{'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}"]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        lines.append(f"   {name[:-3]:<6}{stat(getattr(s, name))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from load_tests.client import run_load

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.run", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--label", default="run")
    add_workload_args(p)
    args = p.parse_args(argv)
    reqs, prompts = build_requests(args)
    records, duration = asyncio.run(run_load(args.url, args.model, reqs, prompts, rate=args.rate,
                                             concurrency=args.concurrency, duration_s=args.duration,
                                             timeout_s=args.timeout, seed=args.seed))
    result = write_results(Path(args.out), args.label, records, duration, slo_of(args), model=args.model,
                           request_rate=args.rate, max_concurrency=args.concurrency)
    print(format_summary(args.label, Summary(**result["summary"])))
    return 0 if result["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
