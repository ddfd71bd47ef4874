"""``python -m load_tests.compare``: the same workload against each prefill policy, served for real, in one run.

For every policy (``dynamic`` and ``static:<strategy>``) the Serve application of ``serve_config.yaml`` is deployed
with that policy (its builder's ``policy`` argument), warmed up, and loaded with the identical request list. The
table gives each policy's figures and their ratios against ``static:megatron`` measured in the same run; plots of
the latency CDFs and of TTFT against prompt length are written next to the JSON/CSV results.

``--repeats N`` runs N rounds; round r runs the policy list rotated by r, so no policy always runs first (warm-up,
caches and machine drift then fall on every policy in turn). The table then shows each policy's median over rounds
and its per-round ratios to the baseline as ``median [min–max]``, marked ✓ only where that spread does not cover 1.0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from load_tests.metrics import Summary
from load_tests.run import add_workload_args, build_requests, format_summary, slo_of, write_results

POLICIES = ["static:megatron", "static:weight_gathered", "static:projection_replicated", "dynamic"]
BASELINE = "static:megatron"


def load_app_spec(config: str) -> tuple[str, dict, dict]:
    """import_path, args and http options of the first application in a Serve config file."""
    cfg = yaml.safe_load(Path(config).read_text())
    app = cfg["applications"][0]
    return app["import_path"], dict(app.get("args") or {}), dict(cfg.get("http_options") or {})


def build_app(import_path: str, args: dict):
    module, _, attr = import_path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)(args)


def wait_ready(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as client:  # one for the polls: each new client builds an SSL context
        while time.monotonic() < deadline:
            try:
                if client.get(url.rstrip("/") + "/v1/models").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
    raise TimeoutError(f"{url} did not become ready in {timeout_s:.0f} s")


@contextmanager
def local_serve(port: int) -> Iterator[str]:
    """Ray and Serve on this machine for the duration, HTTP on 127.0.0.1:``port``; yields the base URL."""
    import ray
    from ray import serve

    from placement.workers import local_ray_options

    ray.init(**local_ray_options())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(url: str, import_path: str, args: dict, name: str) -> None:
    """Run the app built from ``import_path``/``args`` as ``name`` on the local Serve and wait until it answers."""
    from ray import serve

    serve.run(build_app(import_path, args), name=name, route_prefix="/")
    wait_ready(url)


# The figures compared, one table row each: a label and how to read it off a Summary (None where not measured).
METRICS: list[tuple[str, Callable[[Summary], float | None]]] = [
    ("TTFT p50", lambda s: s.ttft_ms and s.ttft_ms.p50), ("TTFT p90", lambda s: s.ttft_ms and s.ttft_ms.p90),
    ("TPOT p50", lambda s: s.tpot_ms and s.tpot_ms.p50), ("E2E p50", lambda s: s.e2e_ms and s.e2e_ms.p50),
    ("E2E p90", lambda s: s.e2e_ms and s.e2e_ms.p90), ("req/s", lambda s: s.request_throughput),
    ("goodput", lambda s: s.goodput)]


def _header(names: list[str]) -> list[str]:
    return ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]


def ratio_table(results: dict[str, Summary]) -> str:
    base = results.get(BASELINE)
    names = list(results)
    lines = _header(names)
    for label, get in METRICS:
        cells = []
        for n in names:
            v, b = get(results[n]), get(base) if base else None
            cells.append("-" if v is None else f"{v:.4g}" + (f" ({v / b:.2f}x)" if b else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rotated(policies: list[str], r: int) -> list[str]:
    """The order of round ``r``: the list rotated left by ``r``, so each policy takes every position in turn and
    whatever favours an early (or late) slot is not credited to one policy."""
    if not policies:
        return []
    k = r % len(policies)
    return policies[k:] + policies[:k]


def run_label(policy: str, r: int, repeats: int) -> str:
    """File label of one (policy, round); a single round keeps the old label so existing result names stay valid."""
    label = policy.replace(":", "_")
    return label if repeats == 1 else f"{label}_r{r}"


def same_side_of_one(ratios: list[float]) -> bool:
    """True where every ratio is above 1 or every ratio is below 1, i.e. the spread does not cover "no difference".

    At least two ratios are required: one round has no spread, so it cannot show that a difference is not noise."""
    return len(ratios) >= 2 and (all(x > 1.0 for x in ratios) or all(x < 1.0 for x in ratios))


def spread_cell(values: list[float], ratios: list[float] | None) -> str:
    """``median`` of the values, then for a non-baseline policy ``(medianx [min–max])`` of its per-round ratios."""
    if not values:
        return "-"
    cell = f"{statistics.median(values):.4g}"
    if ratios:
        cell += f" ({statistics.median(ratios):.2f}x [{min(ratios):.2f}–{max(ratios):.2f}])"
        cell += " ✓" if same_side_of_one(ratios) else ""
    return cell


def round_values(rounds: list[dict[str, Summary]], name: str,
                 get: Callable[[Summary], float | None]) -> tuple[list[float], list[float]]:
    """One policy's values over the rounds, and its ratios to the baseline of the same round.

    Ratios are taken within a round because rounds differ (order, drift); a round where either figure is missing
    (or the baseline's is 0) gives no ratio."""
    values, ratios = [], []
    for rnd in rounds:
        v = get(rnd[name]) if name in rnd else None
        if v is None:
            continue
        values.append(v)
        b = get(rnd[BASELINE]) if BASELINE in rnd else None
        if b:
            ratios.append(v / b)
    return values, ratios


def spread_table(rounds: list[dict[str, Summary]]) -> str:
    """The ratio table over several rounds: medians, per-round ratio ranges, and ✓ where a difference can be claimed.

    Columns follow the first appearance of each policy (round 0 is the list as given)."""
    names = list(dict.fromkeys(n for rnd in rounds for n in rnd))
    lines = _header(names)
    for label, get in METRICS:
        cells = []
        for n in names:
            values, ratios = round_values(rounds, n, get)
            cells.append(spread_cell(values, None if n == BASELINE else ratios))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\n{len(rounds)} rounds: median value; ratio to {BASELINE} of the same round as median [min–max]; "
                 "✓ where every round's ratio is on the same side of 1.")
    return "\n".join(lines)


def plot(out: Path, runs: dict[str, list]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, records in runs.items():
        ok = [r for r in records if r.ok]
        for ax, values in ((axes[0], [r.ttft_s * 1e3 for r in ok]), (axes[1], [r.latency_s * 1e3 for r in ok])):
            if values:
                v = np.sort(values)
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=name)
        axes[2].scatter([r.prompt_tokens for r in ok], [r.ttft_s * 1e3 for r in ok], s=10, label=name)
    for ax, title in zip(axes, ("TTFT CDF", "end-to-end latency CDF", "TTFT against prompt length")):
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("ms"), axes[1].set_xlabel("ms"), axes[2].set_xlabel("prompt tokens")
    axes[2].set_ylabel("TTFT ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.compare", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before each policy's run")
    p.add_argument("--repeats", type=int, default=1, help="rounds, each with the policy order rotated by one more")
    add_workload_args(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    import_path, app_args, http = load_app_spec(args.config)
    reqs, prompts = build_requests(args)
    out = Path(args.out)
    policies = args.policies.split(",")
    rounds: list[dict[str, Summary]] = []
    runs: dict[str, list] = {}
    with local_serve(int(http.get("port", 8000))) as url:
        for r in range(args.repeats):
            summaries: dict[str, Summary] = {}
            for policy in rotated(policies, r):
                summaries[policy], records = _run_policy(url, args, import_path, app_args, policy, reqs, prompts,
                                                         run_label(policy, r, args.repeats))
                # The plot shows round 0's records: that round runs the list as given, so with N == 1 the plot is the
                # same as before and with N > 1 each curve is one run rather than rounds of different order pooled.
                runs.setdefault(policy, records)
                print(f"[round {r}] " + format_summary(policy, summaries[policy]), flush=True)
            rounds.append({n: summaries[n] for n in policies})  # the given order, whatever order the round ran in
    table = ratio_table(rounds[0]) if args.repeats == 1 else spread_table(rounds)
    (out / "compare.md").write_text(table + "\n", encoding="utf-8")
    plot(out, {n: runs[n] for n in policies})
    print(table)
    return 0


def _run_policy(url: str, args: argparse.Namespace, import_path: str, app_args: dict, policy: str, reqs, prompts,
                label: str) -> tuple[Summary, list]:
    """Deploy one policy, warm it up, load it, write its results under ``label``, and take it down again."""
    from ray import serve

    deploy(url, import_path, {**app_args, "policy": policy}, "dynpart")
    asyncio.run(_warmup(url, args.model, prompts[: args.warmup]))
    records, duration = asyncio.run(_load(url, args, reqs, prompts))
    result = write_results(Path(args.out), label, records, duration, slo_of(args))
    serve.delete("dynpart")
    return Summary(**result["summary"]), records


async def _load(url, args, reqs, prompts):
    from load_tests.client import run_load

    return await run_load(url, args.model, reqs, prompts, rate=args.rate, concurrency=args.concurrency,
                          duration_s=args.duration, timeout_s=args.timeout, seed=args.seed)


async def _warmup(url: str, model: str, prompts: list[str]) -> None:
    async with httpx.AsyncClient(timeout=300) as client:
        for prompt in prompts:
            await client.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2})


if __name__ == "__main__":
    raise SystemExit(main())
