"""``dynpart bench engine | strategies | accuracy`` and ``dynpart calibrate``: measure this machine.

Thin: parsing, progress and tables; the measurements live in ``load_tests.engine_runs`` and ``placement.calibrate``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.cli.format import markdown_table, mib, ms, positive_ints, progress
from strategies.shapes import DEFAULT_MODEL


def register(sub) -> None:
    bench = sub.add_parser("bench", help="measure the engine, the strategies, and the cost model's accuracy")
    which = bench.add_subparsers(dest="bench", required=True)

    p = which.add_parser("engine", help="our engine against transformers on one device: prefill and decode tokens/s")
    _common(p)
    p.add_argument("--lengths", default="128,512,2048", help="prompt lengths for prefill (comma-separated)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per decode measurement")
    p.add_argument("--decode-prompt", type=int, default=128, help="prompt length before decode")
    p.set_defaults(func=cmd_engine, repeats_default=5)

    p = which.add_parser("strategies", help="prefill time of each strategy by length on p workers, handoff, memory")
    _common(p)
    _strategy_args(p)
    p.set_defaults(func=cmd_strategies, repeats_default=5)

    p = which.add_parser("accuracy", help="predicted (planner) against measured prefill time per strategy and length")
    _common(p)
    _strategy_args(p)
    p.add_argument("--hardware", default="cpu", help="catalog entry whose calibration profile the planner uses")
    p.add_argument("--measured", metavar="FILE.json", help="a `bench strategies --json` result instead of measuring")
    p.add_argument("--correction", metavar="FILE.json", help="also score the predictions corrected by this learned "
                   "correction (what a served pool saved under <profile dir>/corrections/)")
    p.add_argument("--learn-steps", type=int, default=0, metavar="N",
                   help="first serve N engine steps with online correction on (prompts of --learn-lengths, from a "
                   "fresh correction) and also score the predictions corrected by what it learned")
    p.add_argument("--learn-lengths", default="60,300,1000,2200",
                   help="prompt lengths the learning traffic cycles through (comma-separated)")
    p.add_argument("--save-learned", metavar="FILE.json", help="write the learned correction here (for --correction)")
    p.set_defaults(func=cmd_accuracy, repeats_default=5)

    p = sub.add_parser("calibrate", help="measure GEMMs, attention, memory, collectives; store the planner's profile")
    p.add_argument("--model", default=DEFAULT_MODEL, help="whose layer shards the GEMMs multiply")
    p.add_argument("--devices", type=int, default=2, help="shard workers measured together (p)")
    p.add_argument("--hardware", default="cpu", help="catalog entry the profile calibrates")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--dry-run", action="store_true", help="print the profile without saving it")
    _quiet_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} (embedded) or a local Llama folder")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _quiet_arg(p)


def _quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                   help="before each round, wait up to this long for other processes to leave the CPU idle (0: never)")


def _strategy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--lengths", default="16,64,256,1024,4096", help="prompt lengths (comma-separated)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per length after which repeats stop (min 3)")
    p.add_argument("--no-handoff", action="store_true", help="skip the K/V handoff between two groups")
    p.add_argument("--layouts", default="named",
                   help="named (the three strategies), contenders (the layouts the engine's planner picks from), "
                        "front (every layout of the executable Pareto front), or strategy names and layout labels "
                        "separated by ';'")


def _repeats(args) -> int:
    r = args.repeats if args.repeats is not None else args.repeats_default
    if r < 1:
        raise ValueError("--repeats must be at least 1")
    return r


def _machine_line(m: dict) -> str:
    gpu = "GPU " + m["gpu"] if m["gpu"] else "no GPU"
    return (f"{m['cores']}-core {m['cpu'] or 'CPU'}, {gpu}, torch {m['torch']}, "
            f"load average at start {m['load_avg']}, {m['date']}")


def cmd_engine(args: argparse.Namespace) -> int:
    from load_tests.engine_runs import bench_engine

    lengths = positive_ints(args.lengths, "lengths")
    bar, step = progress(len(lengths) + 1)
    with bar:
        res = bench_engine(args.model, lengths, args.decode_tokens, args.decode_prompt, _repeats(args),
                           quiet_wait_s=args.quiet_wait, progress=step)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['model']}, 1 device ({res['threads']} threads), median of {res['repeats']} clean repeats; "
          f"{_machine_line(res['machine'])}")
    print(markdown_table(["", "tokens", "dynpart tok/s", "transformers tok/s", "dynpart / transformers", "clean/all"],
                 [[r["kind"], r["tokens"], f"{r['dynpart_tok_s']:.0f}", f"{r['transformers_tok_s']:.0f}",
                   f"{r['ratio']:.2f}×", f"{r['clean']}/{r['samples']}"] for r in res["rows"]]))
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    res = _measure_strategies(args)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_strategies(res))
    return 0


def _measure_strategies(args: argparse.Namespace) -> dict:
    from load_tests.engine_runs import bench_strategies

    lengths = positive_ints(args.lengths, "lengths")
    handoff = not args.no_handoff and args.devices > 1
    bar, step = progress(len(lengths) * (2 if handoff else 1))
    with bar:
        return bench_strategies(args.model, args.devices, lengths, _repeats(args), budget_s=args.budget,
                                strategies=_layouts(args), handoff=handoff, quiet_wait_s=args.quiet_wait,
                                progress=step)


def _layouts(args: argparse.Namespace) -> list[str]:
    from cost import get_hardware
    from cost.planner import contenders, executable_layouts
    from strategies.layout import STRATEGY_NAMES, check_strategy
    from strategies.loader import Checkpoint

    if args.layouts == "named":
        return list(STRATEGY_NAMES)
    if args.layouts not in ("contenders", "front"):
        return [check_strategy(x.strip()) for x in args.layouts.split(";") if x.strip()]
    shape, hw = Checkpoint(args.model).shape, get_hardware(getattr(args, "hardware", "cpu"))
    front = executable_layouts(shape, hw, args.devices)
    return front if args.layouts == "front" else contenders(shape, hw, args.devices, front, 4096)


def format_strategies(res: dict) -> str:
    names = list(res["available"])
    lines = [f"{res['model']} on {res['devices']} shard workers; {_machine_line(res['machine'])}",
             "Prefill, median ms of clean repeats (best in bold); clean/all repeats per strategy:"]
    rows = []
    for r in res["rows"]:
        best = min(r["median_s"], key=r["median_s"].get)
        rows.append([r["tokens"], *[(f"**{ms(r['median_s'][s])}**" if s == best else ms(r["median_s"][s]))
                                    for s in names],
                     " ".join(f"{r['clean'][s]}/{r['samples'][s]}" for s in names)])
    lines.append(markdown_table(["tokens", *names, "clean/all"], rows))
    if res["handoff"]:
        lines += ["", "K/V handoff between two groups (put_kv → take_kv, rank to rank through the object store):"]
        lines.append(markdown_table(["tokens", "K/V MiB (all ranks)", "handoff ms", "vs megatron prefill", "decode exact"],
                            [[h["tokens"], f"{h['kv_bytes'] / 2**20:.1f}", ms(h["median_s"]),
                              f"{h['median_s'] / r['median_s']['megatron']:.1%}", h["exact"]]
                             for h, r in zip(res["handoff"], res["rows"])]))
    lines += ["", "Memory per worker, MiB (memory_report; RSS and PSS of the process):"]
    mem_rows = []
    for snap in res["memory"]:
        for rank, m in enumerate(snap["ranks"]):
            mem_rows.append([snap["after"], rank, mib(m["weights"]), mib(m["gather_buffer"]), mib(m["replicas"]),
                             mib(m["rss"]), mib(m["pss"])])
    lines.append(markdown_table(["after", "rank", "weights", "gather buffer", "replicas", "RSS", "PSS"], mem_rows))
    return "\n".join(lines)


def cmd_accuracy(args: argparse.Namespace) -> int:
    from load_tests.engine_runs import accuracy
    from cost import get_hardware

    hw = get_hardware(args.hardware)
    learned = _learn(args) if args.learn_steps > 0 else None
    if args.measured:
        with open(args.measured) as f:
            measured = json.load(f)
    else:
        measured = _measure_strategies(args)
    table = None
    if args.correction:
        from cost.correction import Correction, CorrectionState

        with open(args.correction) as f:
            table = Correction.from_state(CorrectionState.model_validate_json(f.read())).table()
    elif learned is not None:
        table = learned.table()
    res = accuracy(measured, hw, table)
    res["measured"] = measured
    if args.json:
        print(json.dumps(res))
        return 0
    print(format_accuracy(res))
    if "corrected" in res:
        source = args.correction or f"{args.learn_steps} served steps at {args.learn_lengths} tokens"
        print(f"\ncorrected by {source} ({res['corrected']['steps']} steps learned):")
        print(format_accuracy({**res, **res["corrected"]}))
    return 0


def _learn(args: argparse.Namespace):
    """The correction an engine learns online in ``--learn-steps`` steps (saved to ``--save-learned``)."""
    from load_tests.engine_runs import learn_correction

    if args.correction:
        raise SystemExit("dynpart bench accuracy: --correction and --learn-steps both give the correction: pick one")
    lengths = positive_ints(args.learn_lengths, "learn-lengths")
    bar, step = progress(args.learn_steps)
    with bar:
        learned = learn_correction(args.model, args.devices, args.hardware, lengths, args.learn_steps, progress=step)
    if args.save_learned:
        learned.save(Path(args.save_learned))
    return learned


def format_accuracy(res: dict) -> str:
    names = list(res["rows"][0]["measured_s"])
    src = res["calibrated_from"] or "UNCALIBRATED catalog entry (run `dynpart calibrate`)"
    head = f"planner ({res['hardware']}, profile {src}) against measurement, p = {res['devices']}"
    if len(names) > 3:  # layouts: one row per length and layout
        rows = [[r["tokens"], s, ms(r["measured_s"][s]), ms(r["predicted_s"][s]),
                 f"{r['ape'].get(s, float('nan')):.0%}",
                 "chosen" if s == r["choice"] else "", "best" if s == r["measured_best"] else ""]
                for r in res["rows"] for s in names]
        summary = [[r["tokens"], r["choice"], r["measured_best"], f"{r['regret']:.1%}"] for r in res["rows"]]
        return "\n".join([head, markdown_table(["tokens", "layout", "measured ms", "predicted ms", "error", "", ""],
                                                rows),
                          markdown_table(["tokens", "choice", "measured best", "regret"], summary),
                          f"MAPE {res['mape']:.1%}; largest regret {res['max_regret']:.1%}"])
    lines = [head,
             markdown_table(["tokens", *[f"{s} meas/pred ms (err)" for s in names], "choice", "measured best", "regret"],
                    [[r["tokens"], *[f"{ms(r['measured_s'][s])} / {ms(r['predicted_s'][s])} "
                                     f"({r['ape'].get(s, float('nan')):.0%})" for s in names],
                      r["choice"], r["measured_best"], f"{r['regret']:.1%}"] for r in res["rows"]]),
             f"MAPE {res['mape']:.1%}; largest regret {res['max_regret']:.1%}"]
    return "\n".join(lines)


NOISY = 0.05  # a calibration noisier than this says the machine was busy


def cmd_calibrate(args: argparse.Namespace) -> int:
    from load_tests.engine_runs import calibrate
    from cost import get_hardware, save_profile

    get_hardware(args.hardware, use_profile=False)  # a bad name fails before any worker starts
    spec = {"repeats": args.repeats, "quiet_wait": args.quiet_wait}
    raw, profile = calibrate(args.model, args.devices, args.hardware, spec)
    path = None if args.dry_run else str(save_profile(profile))
    if args.json:
        print(json.dumps({"profile": profile.model_dump(), "path": path, "raw": raw}))
        return 0
    print(f"{args.hardware}: {args.devices} workers measured together on {args.model}'s layer shards")
    print(markdown_table(["token rows", "GEMM GFLOP/s per worker"], [[g.rows, f"{g.tflops * 1e3:.1f}"] for g in profile.gemm]))
    sharded = {a.rows * args.devices: a.tflops for a in profile.attention_sharded}
    print(markdown_table(["sequence length", "attention GFLOP/s per worker", "token-sharded (last shard, counted FLOPs)"],
                 [[a.rows, f"{a.tflops * 1e3:.1f}", f"{sharded[a.rows] * 1e3:.1f}" if a.rows in sharded else "—"]
                  for a in profile.attention]))
    print(f"memory bandwidth {profile.memory_bandwidth_gbs:.1f} GB/s; prefetched gather hidden behind compute: "
          f"{profile.prefetch_overlap if profile.prefetch_overlap is not None else 1:.0%}")
    print(f"decode step {raw['decode_step'] * 1e3:.1f} ms ({raw['local_step'] * 1e3:.1f} ms of it without "
          f"collectives): per-op overhead κ {profile.launch_overhead_us:.0f} µs (tiny-kernel microbenchmark "
          f"{raw['launch_overhead_us']:.1f} µs), wait per blocking collective {profile.sync_overhead_us or 0:.0f} µs")
    if profile.collectives:
        print(markdown_table(["collective", "α µs per step", "β GB/s"],
                     [[k, f"{v.latency_us:.0f}", f"{v.bandwidth_gbs:.2f}"] for k, v in profile.collectives.items()]))
    if profile.spread is not None:
        print(f"noise of repeated measurements: {profile.spread:.1%} (the planner calls layouts predicted closer than "
              "this ties)" + (f"; above {NOISY:.0%}: this machine was not quiet, calibrate again when it is"
                              if profile.spread > NOISY else ""))
    print(f"profile written to {path}" if path else "dry run: profile not saved")
    return 0
