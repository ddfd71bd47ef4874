"""Measurements behind ``dynpart bench`` and ``dynpart calibrate``: our engine against transformers, the three prefill
strategies on p shard workers (with the K/V handoff and memory per worker), and the cost model's predictions against
those measurements.

Every figure is a median over repeats after a warm-up, and every comparison is made within one run, with the
contenders interleaved repeat by repeat so that load from elsewhere on the machine hits them alike.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from placement.calibrate import Interference, relative_spread, timed
from strategies.kv_cache import Chunk
from strategies.layout import STRATEGY_NAMES
from strategies.shapes import DEFAULT_BLOCK_SIZE


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                budget_s: float | None = None, meter: Interference | None = None,
                max_interference: float = 0.25, after: Callable[[], object] | None = None,
                quiet_wait_s: float = 30.0) -> dict[str, dict]:
    """Time each contender, round by round (each called once per round, so drifting load hits them alike).

    After ``warmup`` rounds, rounds run until every contender has ``repeats`` clean samples — taken while other
    processes used under ``max_interference`` cores (each round waits for a quiet moment first) — or ``budget_s`` is
    spent (then at least 3 rounds). ``after`` runs untimed after every call (e.g. freeing a KV slot). Returns per
    contender: ``median_s`` (of clean samples, or of all when none was
    clean), ``min_s``, ``clean`` and ``samples`` counts, and ``interference`` (median cores used by others)."""
    meter = meter or Interference()
    after = after or (lambda: None)
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
            after()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    start = time.perf_counter()
    rounds = 0
    while True:
        clean = min(sum(x < max_interference for _, x in v) for v in samples.values())
        if clean >= repeats:
            break
        if budget_s is not None and rounds >= 3 and time.perf_counter() - start > budget_s:
            break
        if budget_s is None and rounds >= 4 * repeats:
            break
        if quiet_wait_s > 0:
            meter.wait_quiet(timeout_s=quiet_wait_s)
        for name, fn in contenders.items():
            samples[name].append(meter.run(fn))
            after()
        rounds += 1
    out = {}
    for name, v in samples.items():
        good = [t for t, x in v if x < max_interference]
        out[name] = {"median_s": statistics.median(good or [t for t, _ in v]), "min_s": min(t for t, _ in v),
                     "clean": len(good), "samples": len(v), "interference": statistics.median(x for _, x in v),
                     "spread": relative_spread(good or [t for t, _ in v]),
                     "is_clean": [x < max_interference for _, x in v]}
    return out


def machine() -> dict:
    """What the numbers were measured on (for the record next to them)."""
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "load_avg": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def random_prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


# -- engine against transformers (p = 1) ---------------------------------------------------------------------------

def bench_engine(model: str, lengths: Sequence[int], decode_tokens: int, decode_prompt: int, repeats: int,
                 budget_s: float = 120.0, quiet_wait_s: float = 30.0,
                 progress: Callable[[str], None] = lambda s: None) -> dict:
    """Prefill tokens/s at each prompt length and decode tokens/s, ours and transformers', in one process.

    Ours: the engine's prefill step (``ShardRunner.prefill``, megatron on one device) and its decode loop
    (``LLMEngine.generate``: decode steps, sampling, detokenisation). Theirs: ``LlamaForCausalLM`` forward with a
    KV cache (``logits_to_keep=1`` for prefill) and a greedy loop over cached forwards (faster than ``generate``).
    """
    from transformers import DynamicCache, LlamaForCausalLM

    from app.engine.build import EngineOptions, build_engine
    from app.engine.params import SamplingParams
    from strategies.loader import Checkpoint

    ckpt = Checkpoint(model)
    cap = max(max(lengths), decode_prompt) + decode_tokens + 1
    engine = build_engine(EngineOptions(model=model, devices=1, max_num_seqs=1, max_model_len=cap,
                                        max_num_batched_tokens=cap, enable_prefix_caching=False))
    hf = LlamaForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
    vocab = ckpt.shape.vocab_size
    rows = []
    try:
        for n in lengths:
            progress(f"prefill {n}")
            ids = random_prompt(n, vocab)

            def ours():
                engine.group.call("forward", [whole(ids)], "megatron")

            def theirs():
                with torch.inference_mode():
                    hf(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

            t = interleaved({"dynpart": ours, "transformers": theirs}, repeats, budget_s=budget_s,
                            quiet_wait_s=quiet_wait_s)
            med = {k: v["median_s"] for k, v in t.items()}
            rows.append({"kind": "prefill", "tokens": n, "dynpart_tok_s": n / med["dynpart"],
                         "transformers_tok_s": n / med["transformers"], "ratio": med["transformers"] / med["dynpart"],
                         "clean": min(v["clean"] for v in t.values()), "samples": t["dynpart"]["samples"]})
        progress(f"decode {decode_tokens}")
        prompt = random_prompt(decode_prompt, vocab, seed=1)
        params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)

        def ours_decode() -> None:
            seq = engine.generate([prompt], params, strategy="megatron")[0]
            rates["dynpart"] = (len(seq.output_ids) - 1) / (seq.t_last_token - seq.t_first_token)

        def theirs_decode() -> None:
            with torch.inference_mode():
                cache = DynamicCache()
                out = hf(torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                for _ in range(decode_tokens - 1):
                    out = hf(tok, past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                rates["transformers"] = (decode_tokens - 1) / (time.perf_counter() - t0)

        # Each call is timed whole (prefill included) for the interference check; the rate is over decode steps only.
        rates: dict[str, float] = {}
        collected: dict[str, list[float]] = {"dynpart": [], "transformers": []}

        def keep(name: str, fn: Callable[[], None]) -> Callable[[], None]:
            def run():
                fn()
                collected[name].append(rates[name])
            return run

        t = interleaved({"dynpart": keep("dynpart", ours_decode), "transformers": keep("transformers", theirs_decode)},
                        repeats, budget_s=budget_s, quiet_wait_s=quiet_wait_s)
        med = {}
        for k, v in collected.items():  # v[0] is the warm-up; the rest line up with the timed samples
            good = [r for r, ok in zip(v[1:], t[k]["is_clean"]) if ok]
            med[k] = statistics.median(good or v[1:])
        rows.append({"kind": "decode", "tokens": decode_tokens, "dynpart_tok_s": med["dynpart"],
                     "transformers_tok_s": med["transformers"], "ratio": med["dynpart"] / med["transformers"],
                     "clean": min(v["clean"] for v in t.values()), "samples": t["dynpart"]["samples"]})
    finally:
        engine.group.shutdown()
    return {"model": model, "devices": 1, "threads": torch.get_num_threads(), "decode_prompt": decode_prompt,
            "repeats": repeats, "machine": machine(), "rows": rows}


# -- the three strategies on p workers -------------------------------------------------------------------------------

def runner_kwargs(model: str, devices: int, capacity: int, seqs: int = 2) -> dict:
    """A runner with room for ``seqs`` sequences of ``capacity`` tokens (blocks of the default size)."""
    from strategies.loader import Checkpoint

    return dict(model=str(Checkpoint(model).path), num_blocks=seqs * blocks_for(capacity), dtype=torch.float32,
                replica_budget_bytes=None)  # measured in each worker


def blocks_for(tokens: int) -> int:
    return -(-tokens // DEFAULT_BLOCK_SIZE)


def whole(ids: list[int], cached: int = 0, first_block: int = 0) -> Chunk:
    """``ids`` at position ``cached`` of a sequence whose blocks are consecutive from ``first_block`` (benchmarks run
    one sequence at a time, so any blocks will do)."""
    return Chunk(ids, cached, list(range(first_block, first_block + blocks_for(cached + len(ids)))))


def process_memory(pids: Sequence[int]) -> list[dict]:
    """Resident (RSS) and proportional (PSS: shared pages split between sharers) memory of each worker process."""
    import psutil

    out = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        out.append({"rss": info.rss, "pss": getattr(info, "pss", info.rss)})
    return out


def memory_snapshot(group, label: str) -> dict:
    reports = group.call_all("memory_report")
    procs = process_memory(group.pids() or [os.getpid()])
    return {"after": label, "ranks": [{**r, **m} for r, m in zip(reports, procs)]}


def bench_strategies(model: str, devices: int, lengths: Sequence[int], repeats: int, budget_s: float = 60.0,
                     strategies: Sequence[str] = STRATEGY_NAMES, handoff: bool = True, quiet_wait_s: float = 30.0,
                     progress: Callable[[str], None] = lambda s: None) -> dict:
    """Prefill seconds of each strategy at each length on ``devices`` shard workers, the K/V handoff between two
    groups, and memory per worker (before any prefill, after the first weight-gathered and replicated ones)."""
    from placement.workers import start_group
    from strategies.loader import Checkpoint

    shape = Checkpoint(model).shape
    kwargs = runner_kwargs(model, devices, capacity=max(lengths) + 8)
    group = start_group(devices, kwargs)
    decode_group = start_group(devices, kwargs) if handoff and devices > 1 else None
    available = group.call("available_strategies", list(strategies))
    memory = [memory_snapshot(group, "start (resident shards only)")]
    pids = [*group.pids(), *(decode_group.pids() if decode_group is not None else [])]
    meter = Interference(pids)
    rows, handoffs = [], []
    try:
        for name in strategies:  # first prefill of each: allocates its buffers/replicas; record memory after
            if name in available:
                group.call("forward", [whole(random_prompt(16, shape.vocab_size))], name)
                memory.append(memory_snapshot(group, f"first {name} prefill"))
        for n in lengths:
            progress(f"prefill {n}")
            ids = random_prompt(n, shape.vocab_size)

            def prefill(name: str) -> Callable[[], None]:
                return lambda: group.call("forward", [whole(ids)], name)

            # every layout already ran once (above: its buffers and replicas exist); one pass at this length touches
            # the KV pages it writes, so no layout's first timed call pays for that: no warm-up round per layout
            prefill("megatron")()
            t = interleaved({s: prefill(s) for s in strategies if s in available}, repeats, warmup=0,
                            budget_s=budget_s, meter=meter, quiet_wait_s=quiet_wait_s)
            rows.append({"tokens": n, **{k: {s: v[k] for s, v in t.items()}
                                         for k in ("median_s", "min_s", "clean", "samples", "interference")}})
            if decode_group is not None:
                progress(f"handoff {n}")
                handoffs.append(measure_handoff(group, decode_group, ids, repeats))
    finally:
        group.shutdown()
        if decode_group is not None:
            decode_group.shutdown()
    return {"model": model, "shape": shape.model_dump(), "devices": devices, "available": available,
            "machine": machine(), "rows": rows, "handoff": handoffs, "memory": memory}


def measure_handoff(prefill_group, decode_group, ids: list[int], repeats: int) -> dict:
    """Seconds to move one prefilled sequence's head-sharded K/V from a prefill group to a decode group, rank to rank
    through the object store (``put_kv``/``take_kv``), and whether decode continues exactly (same next-token logits).

    One prefill, then ``repeats`` + 1 handoffs of it (``take_kv`` overwrites the same decode blocks)."""
    chunk = whole(ids)
    table = [(chunk.blocks, len(ids))]
    prefill_group.call("forward", [chunk], "megatron")
    times = [timed(lambda: decode_group.take_kv([chunk.blocks], prefill_group.put_kv(table)))
             for _ in range(repeats + 1)][1:]
    kv_bytes = sum(decode_group.call_all("kv_block_bytes")) * len(ids) // DEFAULT_BLOCK_SIZE
    step = [whole([ids[-1]], cached=len(ids))]
    exact = bool(torch.equal(prefill_group.call("forward", step), decode_group.call("forward", step)))
    return {"tokens": len(ids), "median_s": statistics.median(times), "exact": exact, "kv_bytes": kv_bytes}


# -- calibration and accuracy ---------------------------------------------------------------------------------------

def calibrate(model: str, devices: int, hardware: str, spec: dict) -> tuple[dict, object]:
    """Run the measurements inside ``devices`` shard workers holding ``model``, plus a timed megatron decode step
    from the driver (what κ is fitted to); return (raw measurements, CalibrationProfile)."""
    from cost.fit import build_profile
    from placement.calibrate import calibrate_runner
    from placement.workers import start_group
    from strategies.loader import Checkpoint

    shape = Checkpoint(model).shape
    context, repeats, quiet = 16, int(spec.get("repeats", 5)), float(spec.get("quiet_wait", 30.0))
    # decode steps: at most 1 warm-up + 4·repeats rounds (``interleaved`` without a budget)
    group = start_group(devices, runner_kwargs(model, devices, capacity=context + 4 * repeats + 2, seqs=1))
    try:
        meter = Interference([os.getpid(), *group.pids()])
        spec = {**spec, "pids": meter.pids}
        if quiet > 0:
            meter.wait_quiet(timeout_s=quiet)
        raw = calibrate_runner(group.runner, spec) if devices == 1 else group.call_workers("calibrate", spec)[0]
        ids = random_prompt(context, shape.vocab_size)
        group.call("forward", [whole(ids)], "megatron")
        context_now = [context]

        def decode() -> None:  # one token more each time, as decode does
            group.call("forward", [whole([ids[0]], cached=context_now[0])])
            context_now[0] += 1

        step = interleaved({"decode": decode}, repeats, meter=meter, quiet_wait_s=quiet)["decode"]
        raw |= {"decode_step": step["median_s"], "decode_context": context + step["samples"] // 2,
                "decode_spread": step["spread"]}
    finally:
        group.shutdown()
    return raw, build_profile(hardware, devices, raw, torch.float32.itemsize, shape=shape)


def learn_correction(model: str, devices: int, hardware: str, lengths: Sequence[int], steps: int,
                     decode_tokens: int = 8, progress: Callable[[str], None] | None = None):
    """What a served pool learns online: an engine with ``online_correction`` on, starting from a fresh correction,
    serves prompts of ``lengths`` in turn (each new, nothing cached, ``decode_tokens`` tokens each, one at a time so
    every prefill runs alone as one chunk) until ``steps`` steps have run; returns the ``Correction`` it learned. The
    engine chooses each prompt's layout by its corrected predictions, as a pool does, so it learns from its choices."""
    from app.engine.build import EngineOptions, build_engine
    from app.engine.params import SamplingParams
    from cost.correction import Correction

    cap = max(lengths) + decode_tokens
    engine = build_engine(EngineOptions(model=model, devices=devices, hardware=hardware, max_num_seqs=1,
                                        max_model_len=cap, max_num_batched_tokens=cap, enable_prefix_caching=False))
    predictor = engine.predictor
    predictor.correction, predictor.path = Correction(predictor.correction.stamp), None  # fresh; the pool's file kept
    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)
    vocab = predictor.shape.vocab_size
    try:
        ran, i = 0, 0
        while ran < steps:
            n = lengths[i % len(lengths)]
            engine.add(random_prompt(n, vocab, seed=1000 + i), params)
            while engine.has_work() and ran < steps:
                engine.step()
                ran += 1
                if progress:
                    progress(f"learning online: {n}-token prompts")
            i += 1
        return predictor.correction
    finally:
        engine.group.shutdown()


def accuracy(measured: dict, hardware, table=None) -> dict:
    """The planner against a ``bench_strategies`` result: predicted vs measured seconds per strategy and length
    (absolute percentage error), and the regret of the planner's choice against the measured best per length. With a
    learned ``table`` (``cost.correction.CorrectionTable``) the corrected predictions are scored the same way
    (``corrected``)."""
    from cost import plan_prefill
    from cost.correction import corrected_choice
    from strategies.shapes import ModelShape

    shape = ModelShape(**measured["shape"])
    p, available = measured["devices"], measured["available"]

    def score(plans: list) -> tuple[list[dict], dict]:
        rows, errors = [], []
        for row, plan in zip(measured["rows"], plans):
            n, meas = row["tokens"], row["median_s"]
            pred = {s: plan.predicted_s[s] for s in meas}
            ape = {s: abs(pred[s] - meas[s]) / meas[s] for s in meas if pred[s] is not None}
            errors += list(ape.values())
            best = min(meas, key=meas.get)
            rows.append({"tokens": n, "measured_s": meas, "predicted_s": pred, "ape": ape, "choice": plan.strategy,
                         "measured_best": best, "regret": meas[plan.strategy] / meas[best] - 1})
        return rows, {"mape": statistics.fmean(errors), "max_regret": max(r["regret"] for r in rows)}

    plans = [plan_prefill(shape, hardware, p, row["tokens"], available=available) for row in measured["rows"]]
    rows, summary = score(plans)
    out = {"hardware": hardware.name, "calibrated_from": hardware.calibrated_from, "devices": p, **summary,
           "rows": rows}
    if table is not None:
        fixed = [corrected_choice(plan, table, "prefill", row["tokens"], 0)
                 for plan, row in zip(plans, measured["rows"])]
        rows, summary = score(fixed)
        out["corrected"] = {**summary, "steps": table.steps(), "rows": rows}
    return out
