"""``dynpart search | plan | simulate``: the cost model's answers, printed for people or as JSON for tools.

Thin: parsing and formatting only; every number comes from ``cost``. matplotlib is imported only by
``plan --plot``.
"""

from __future__ import annotations

import argparse
import json

from app.cli.format import ms, positive_ints


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="Pareto front of layer partitionings for a model on p devices")
    _target_args(p)
    p.add_argument("--tokens", default="128,4096", help="token counts the front must hold at (comma-separated)")
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser("plan", help="predicted prefill time per layout by input length, and the choice")
    _target_args(p)
    p.add_argument("--lengths", help="input lengths (comma-separated; default powers of two up to the context)")
    p.add_argument("--plot", metavar="FILE.png", help="write time against length per layout, crossovers marked")
    p.add_argument("--layouts", choices=["front", "named"], default="front",
                   help="choose among the whole executable Pareto front (default, as the engine does) or only the "
                        "three named strategies")
    p.set_defaults(func=cmd_plan)

    p = subparsers.add_parser("simulate", help="replay a workload on a cluster for every policy, side by side")
    p.add_argument("--model", required=True, help="catalog name (llama2-7b, ...) or a folder with config.json")
    p.add_argument("--pool", action="append", required=True, metavar="GPU:P[:REPLICAS]",
                   help="a pool of REPLICAS engine replicas of P devices each (repeatable)")
    p.add_argument("--workload", required=True, help="short-chat, long-document, mixture, length-sweep, or a CSV "
                                                     "file with arrival_s,prompt_tokens,output_tokens")
    p.add_argument("--rate", type=float, help="mean arrival rate, requests/s (default: the workload's)")
    p.add_argument("--requests", type=int, default=400, help="requests drawn from a built-in workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT objective, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="time-per-output-token objective, seconds")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--hardware-file", action="append", default=[], help="extra hardware catalog JSON")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="bursty workload: squared coefficient of variation of the gaps (1: Poisson)")
    a = p.add_argument_group("autoscaling (--autoscale: replica counts change during the run; a pool's REPLICAS is "
                             "what fixed keeps and where the autoscalers start)")
    a.add_argument("--autoscale", metavar="POLICIES", help="comma-separated: slo, serve-default, fixed (or all)")
    a.add_argument("--slo-percentile", type=float, default=0.9, help="the TTFT percentile the SLO bounds")
    a.add_argument("--cold-start", type=float, default=60.0, help="seconds from a replica's start to serving")
    a.add_argument("--min-replicas", type=int, default=1)
    a.add_argument("--max-replicas", type=int, default=64)
    a.add_argument("--initial-replicas", type=int, help="where the autoscalers start (default: the pool's REPLICAS)")
    a.add_argument("--target-ongoing", type=float, default=2.0,
                   help="serve-default's target_ongoing_requests (Ray Serve's default: 2)")
    a.add_argument("--max-ongoing", type=int, default=64, help="max_ongoing_requests per replica")
    p.add_argument("--replica-share", type=float, default=0.6,
                   help="of the memory the Megatron shards leave, the share a dynamic policy's replicas may take "
                        "(the rest stays KV cache; an engine pool's replica_budget_gb)")
    p.set_defaults(func=cmd_simulate)


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="catalog name (llama2-7b, ...) or a folder with config.json")
    p.add_argument("--gpu", required=True, help="hardware catalog name (L4, A100-80GB-SXM, cpu, ...)")
    p.add_argument("--devices", type=int, required=True, help="devices p one replica partitions over")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--hardware-file", action="append", default=[], help="extra hardware catalog JSON")


def _resolve(args: argparse.Namespace):
    from cost import check_devices, get_hardware
    from strategies.shapes import model_shape

    shape = model_shape(args.model)
    hw = get_hardware(args.gpu, args.hardware_file)
    check_devices(shape, args.devices)
    return shape, hw


def cmd_search(args: argparse.Namespace) -> int:
    from cost import search

    shape, hw = _resolve(args)
    res = search(shape, hw, args.devices, tuple(positive_ints(args.tokens, "tokens")))
    if args.json:
        print(res.model_dump_json(indent=2))
        return 0
    print(f"Pareto front: {res.model} on {res.devices}×{res.hardware}; {len(res.front)} of {res.candidates} "
          f"candidates kept (axes: FLOPs, blocking bytes, prefetchable weight bytes, latency steps, memory; "
          f"costs per layer, busiest device, at T = {', '.join(map(str, res.tokens))})")
    head = "  ".join(f"{'T=' + str(t):>8} ms  GFLOP  blockMB" for t in res.tokens)
    print(f"{'engine':<22} {head}  weightMB steps  memGB  candidate")
    for m in res.front:
        cells = "  ".join(f"{c.time_s * 1e3:11.3f} {c.flops / 1e9:6.1f} {c.activation_bytes / 1e6:8.1f}"
                          for c in m.costs)
        c0 = m.costs[0]
        eq = f" (+{len(m.equivalents)} equal-cost)" if m.equivalents else ""
        print(f"{m.strategy or '-':<22} {cells}  {c0.weight_bytes / 1e6:8.1f} {c0.latency_steps:5d} "
              f"{c0.memory_bytes / 1e9:6.2f}  {m.label}{eq}")
    named = [m.strategy for m in res.front if m.strategy]
    print(f"\nEvery row runs: the executor runs any layout, and an engine (prefill_layouts: front, the default) "
          f"offers each front member whose replicas fit its replica_budget_gb; `engine` names the rows that are "
          f"named strategies ({', '.join(named) or 'none here'}). A row's candidate label is a valid "
          f"--prefill-strategy.")
    for name, by in res.dominated_strategies.items():
        print(f"{name} is not on the front here: dominated by [{by}].")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from cost import STRATEGIES, plan
    from cost.planner import executable_layouts

    shape, hw = _resolve(args)
    lengths = positive_ints(args.lengths, "lengths") if args.lengths else None
    layouts = executable_layouts(shape, hw, args.devices) if args.layouts == "front" else None
    rep = plan(shape, hw, args.devices, lengths, available=layouts)
    if args.plot:
        from cost.report import plot_plan

        plot_plan(rep, args.plot)
    if args.json:
        print(rep.model_dump_json(indent=2))
        return 0
    cal = f"calibrated from {rep.calibrated_from}" if rep.calibrated_from else "catalog figures, not calibrated"
    lay = rep.layout
    print(f"{rep.model} on {rep.devices}×{rep.hardware} ({cal}); per device: {lay.heads_per_device} query heads, "
          f"{lay.kv_heads_per_device} KV heads (replication {lay.kv_replication}), MLP {lay.intermediate // lay.devices}")
    among = (f"the {len(layouts)} executable layouts (named + Pareto front)" if layouts
             else "the named strategies")
    print(f"\nPredicted prefill time (ms; — = does not fit memory); the choice is among {among}\n{'tokens':>7} "
          + " ".join(f"{n[:21]:>22}" for n in STRATEGIES) + f"  {'choice':>9}  vs megatron  layout chosen")
    for r in rep.lengths:
        print(f"{r.tokens:7d} " + " ".join(f"{ms(r.predicted_s[n], digits=2, width=9):>22}" for n in STRATEGIES)
              + f"  {ms(r.predicted_s[r.choice], digits=2, width=9)}  {r.megatron_over_choice:9.2f}×  {r.choice}")
    print("\nCrossovers: " + ("; ".join(f"from {c.tokens} tokens {c.before} → {c.after}" for c in rep.crossovers)
                              or "none (one strategy wins at every length)"))
    print(f"\nMemory per device at {rep.memory_at_tokens} tokens (GB)")
    shown = {*STRATEGIES, *(r.choice for r in rep.lengths)}
    for m in (m for m in rep.memory if m.strategy in shown):
        print(f"  {m.strategy:<22} weights+buffers {m.resident_gb:6.2f}  activations {m.workspace_gb:5.2f}  "
              f"KV {m.kv_gb:5.2f}  budget {m.budget_gb:6.2f}  {'fits' if m.feasible else 'DOES NOT FIT'}")
    print("\nDecode step (ms; the engine always decodes with megatron)")
    for d in rep.decode:
        print(f"  batch {d.batch:3d} × context {d.context}: megatron {ms(d.predicted_s['megatron'], digits=2)}  "
              f"(model's own choice: {d.choice})")
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


def _pool(spec: str, hardware_files: list[str]):
    from cost import get_hardware
    from cost.simulator import Pool

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(x.isdigit() and int(x) > 0 for x in parts[1:]):
        raise ValueError(f"--pool takes GPU:P[:REPLICAS] with positive whole numbers, got {spec!r}")
    return Pool(hardware=get_hardware(parts[0], hardware_files), devices=int(parts[1]),
                replicas=int(parts[2]) if len(parts) == 3 else 1)


def cmd_simulate(args: argparse.Namespace) -> int:
    from cost import check_devices
    from cost.simulator import SLO, simulate
    from cost.workloads import workload
    from strategies.shapes import model_shape

    shape = model_shape(args.model)
    pools = [_pool(s, args.hardware_file) for s in args.pool]
    for pool in pools:
        check_devices(shape, pool.devices)
    reqs = workload(args.workload, args.requests, args.rate, args.seed, shape.max_position_embeddings,
                    args.burstiness)
    if args.autoscale:
        return _autoscale(args, shape, pools, reqs)
    rep = simulate(shape, pools, reqs, slo=SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot),
                   replica_share=args.replica_share)
    if args.json:
        print(json.dumps(rep.model_dump(exclude={"policies": {"__all__": {"records"}}}), indent=2))
        return 0
    print(f"{rep.model} on {' + '.join(rep.pools)} (GPU:devices:replicas); workload {args.workload}, "
          f"{rep.requests} requests; SLO TTFT ≤ {rep.slo.ttft_s}s, TPOT ≤ {rep.slo.tpot_s}s. Simulated, not measured.")
    print(f"\n{'policy':<30}{'TTFT p50/p90/p99 (s)':>24}{'TPOT p50/p90/p99 (ms)':>24}{'e2e p50/p90/p99 (s)':>24}"
          f"{'SLO met':>9}{'goodput':>9}  prefills by strategy")
    for r in rep.policies:
        if not r.runnable:
            print(f"{r.policy:<30}not runnable: {r.reason}")
            continue
        print(f"{r.policy:<30}{_pct(r.ttft_s, 1):>24}{_pct(r.tpot_s, 1e3):>24}{_pct(r.e2e_s, 1):>24}"
              f"{r.slo_attainment:9.0%}{r.goodput_rps:8.2f}/s  {r.strategies}"
              + (f"  ({r.rejected} rejected)" if r.rejected else ""))
    for dyn in (r for r in rep.policies if r.policy.startswith("dynamic") and r.runnable):
        print(f"\n{dyn.policy} against each other policy (negative = {dyn.policy} is lower/better)")
        for r in rep.policies:
            if r.runnable and r is not dyn:
                print(f"  vs {r.policy:<30} TTFT p50 {_red(dyn.ttft_s.p50, r.ttft_s.p50)}  p90 "
                      f"{_red(dyn.ttft_s.p90, r.ttft_s.p90)}   e2e p50 {_red(dyn.e2e_s.p50, r.e2e_s.p50)}  p90 "
                      f"{_red(dyn.e2e_s.p90, r.e2e_s.p90)}")
    print("\nMedian TTFT / e2e (s) by prompt length")
    runnable = [r for r in rep.policies if r.runnable]
    print(f"{'prompt ≤':>9} {'n':>4} " + "".join(f"{r.policy:>32}" for r in runnable))
    tables = [{b.prompt_up_to: b for b in r.by_length} for r in runnable]
    for edge in sorted({e for t in tables for e in t}):
        cells = "".join(f"{t[edge].ttft_p50_s:>20.3f} /{t[edge].e2e_p50_s:>9.3f}" if edge in t else f"{'—':>32}"
                        for t in tables)
        n = max(t[edge].requests for t in tables if edge in t)
        print(f"{edge if edge < 10**9 else 'more':>9} {n:>4} {cells}")
    return 0


def _autoscale(args: argparse.Namespace, shape, pools, reqs) -> int:
    from cost.autoscale import AutoscaleSettings, SLOTarget
    from cost.autoscale_sim import AUTOSCALERS, ServeDefault, compare_autoscalers

    every = tuple(a for a in AUTOSCALERS if len(pools) > 1 or a != "slo-cheapest")  # the same as slo for one pool
    names = every if args.autoscale == "all" else tuple(x.strip() for x in args.autoscale.split(","))
    unknown = [n for n in names if n not in AUTOSCALERS]
    if unknown:
        raise ValueError(f"--autoscale takes {', '.join(AUTOSCALERS)} or all, got {', '.join(unknown)}")
    slo = SLOTarget(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot, percentile=args.slo_percentile)
    settings = AutoscaleSettings(min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                                 cold_start_s=args.cold_start)
    results = compare_autoscalers(shape, pools, reqs, names, slo=slo, settings=settings,
                                  serve=ServeDefault(target_ongoing_requests=args.target_ongoing),
                                  max_ongoing_requests=args.max_ongoing, initial_replicas=args.initial_replicas)
    if args.json:
        print(json.dumps([r.model_dump() for r in results], indent=2))
        return 0
    pct = f"p{round(slo.percentile * 100)}"
    print(f"{shape.name} on {' + '.join(f'{p.hardware.name}:{p.devices}:{p.replicas}' for p in pools)} "
          f"(GPU:devices:replicas); workload {args.workload}, {len(reqs)} requests over "
          f"{reqs[-1].arrival_s - reqs[0].arrival_s:.0f} s; SLO TTFT {pct} ≤ {slo.ttft_s}s, TPOT ≤ {slo.tpot_s}s; "
          f"replicas {settings.min_replicas}-{settings.max_replicas}, cold start {settings.cold_start_s:g}s. "
          f"Simulated, not measured.")
    print(f"\n{'autoscaler':<15}{'SLO met':>8}{'TTFT p50/p90/p99 (s)':>24}{'TPOT p50/p90 (ms)':>19}"
          f"{'replica-h':>10}{'device-h':>9}{'cost $':>8}{'replicas mean/peak':>19}{'scalings':>9}")
    for r in results:
        tpot = "—" if r.tpot_s is None else f"{r.tpot_s.p50 * 1e3:.0f}/{r.tpot_s.p90 * 1e3:.0f}"
        cost = "—" if r.cost_usd is None else f"{r.cost_usd:.2f}"
        print(f"{r.autoscaler:<15}{r.slo_attainment:8.1%}{_pct(r.ttft_s, 1):>24}{tpot:>19}{r.replica_hours:10.2f}"
              f"{r.device_hours:9.2f}{cost:>8}{f'{r.mean_replicas:.1f}/{r.peak_replicas}':>19}{len(r.events):9d}"
              + (f"  ({r.rejected} rejected)" if r.rejected else ""))
    base = next((r for r in results if r.autoscaler == "serve-default"), None)
    slo_run = next((r for r in results if r.autoscaler == "slo"), None)
    if base and slo_run and base.replica_hours:
        print(f"\nslo against serve-default: {slo_run.replica_hours / base.replica_hours:.2f}× the replica-hours, "
              f"SLO met {slo_run.slo_attainment:.1%} vs {base.slo_attainment:.1%}")
    if slo_run and slo_run.events:
        print("\nslo's scalings (first 8, with the reason each was made):")
        for e in slo_run.events[:8]:
            print(f"  {e.time_s:7.0f}s {e.pool + ' ' if len(pools) > 1 else ''}{e.replicas_from:>3} → "
                  f"{e.replicas_to:<3} {e.reason}")
    return 0


def _pct(p, scale: float) -> str:
    return "—" if p is None else f"{p.p50 * scale:.3f}/{p.p90 * scale:.3f}/{p.p99 * scale:.3f}"


def _red(new: float, old: float) -> str:
    return f"{(new - old) / old:+6.1%}" if old else "   n/a"
