"""Measure this machine for the cost model, inside the shard workers that will run the model.

``measure_rank`` runs on every rank at once (``ShardWorker.calibrate``), so each measurement sees what a real
prefill sees: p workers, each with its share of the cores, busy at the same time. It times
- the rank's own layer matrices (its Megatron shards of QKV, O, gate/up, down) at a range of token rows: achieved
  FLOP/s by rows, the curve the planner's roofline uses instead of a guessed efficiency;
- scaled-dot-product causal attention, the quadratic part of a prefill, as FLOP/s by sequence length;
- a large elementwise kernel (memory bandwidth) and a tiny one (per-kernel overhead κ);
- all-reduce, all-gather, reduce-scatter and all-to-all over a range of sizes, fitted to t = steps·α + bytes/β with
  the same ring formulas the cost model uses (``strategies.cost.formulas``).
``build_profile`` turns the ranks' answers into the ``CalibrationProfile`` that ``get_hardware`` applies.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

GEMM_ROWS = (1, 4, 16, 64, 256, 1024, 4096)
ATTENTION_LENGTHS = (64, 256, 1024, 2048)
COLLECTIVE_BYTES = (16 * 2**10, 256 * 2**10, 2 * 2**20, 8 * 2**20)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def _sync(comm) -> None:
    if comm.world_size > 1:
        dist.barrier()


def time_median(fn: Callable[[], object], comm, repeats: int, warmup: int = 1, budget_s: float = 2.0) -> float:
    """Median seconds of ``fn`` after warm-up; every rank starts each repeat together (barrier).

    Repeats stop early once ``budget_s`` is spent (all ranks agree, so the barriers stay matched)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        _sync(comm)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if comm.world_size > 1:  # agree on stopping: the slowest rank decides
            flag = torch.tensor([spent], dtype=torch.float64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            spent = float(flag)
        if spent > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def _max_over_ranks(comm, value: float) -> float:
    """The busiest rank's figure: a collective or a balanced step is as slow as its slowest rank."""
    if comm.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure_gemm(comm, matrices: Sequence[torch.Tensor], rows: Sequence[int], repeats: int) -> list[dict]:
    """Achieved TFLOP/s of X[rows, K]·Wᵀ summed over the rank's layer matrices (W: [N, K], as the engine stores them)."""
    out = []
    for r in rows:
        xs = [torch.randn(r, w.shape[1], dtype=w.dtype) for w in matrices]

        def step():
            for x, w in zip(xs, matrices):
                x @ w.T

        t = _max_over_ranks(comm, time_median(step, comm, repeats))
        flops = sum(2 * r * w.shape[0] * w.shape[1] for w in matrices)
        out.append({"rows": r, "tflops": flops / t / 1e12, "seconds": t})
    return out


def measure_attention(comm, heads: int, kv_heads: int, head_dim: int, lengths: Sequence[int], repeats: int,
                      dtype: torch.dtype = torch.float32) -> list[dict]:
    """Causal SDPA over one sequence of each length with this rank's heads: TFLOP/s counting 4·pairs·heads·dh."""
    out = []
    for n in lengths:
        q = torch.randn(1, heads, n, head_dim, dtype=dtype)
        k = torch.randn(1, kv_heads, n, head_dim, dtype=dtype)
        v = torch.randn(1, kv_heads, n, head_dim, dtype=dtype)

        def step():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        t = _max_over_ranks(comm, time_median(step, comm, repeats))
        pairs = n * (n + 1) // 2
        out.append({"length": n, "tflops": 4 * pairs * heads * head_dim / t / 1e12, "seconds": t})
    return out


def measure_memory(comm, repeats: int, mbytes: int = 64) -> dict:
    """Memory bandwidth (x += y over ``mbytes`` MiB tensors: 3 passes) and per-kernel overhead (a 1-element add)."""
    n = mbytes * 2**20 // 4
    x, y = torch.ones(n), torch.ones(n)
    t_big = _max_over_ranks(comm, time_median(lambda: x.add_(y), comm, repeats))
    a, b = torch.ones(1), torch.ones(1)

    def tiny():
        for _ in range(100):
            a.add_(b)

    t_tiny = _max_over_ranks(comm, time_median(tiny, comm, repeats)) / 100
    return {"memory_bandwidth_gbs": 3 * n * 4 / t_big / 1e9, "launch_overhead_us": t_tiny * 1e6}


def _collective_fn(kind: str, size_bytes: int, p: int) -> Callable[[], object]:
    """One collective on a full tensor of ``size_bytes`` (float32), shaped as the engine uses it."""
    n = max(p, size_bytes // 4 // p * p)
    if kind == "all_reduce":
        x = torch.ones(n)
        return lambda: dist.all_reduce(x)
    if kind == "all_gather":
        x, out = torch.ones(n // p), torch.empty(n)
        return lambda: dist.all_gather_into_tensor(out, x)
    if kind == "reduce_scatter":
        x, out = torch.ones(n), torch.empty(n // p)
        return lambda: dist.reduce_scatter_tensor(out, x)
    if kind == "all_to_all":  # each rank holds D/p and exchanges (p-1)/p of it: (p-1)/p²·D sent per device
        x, out = torch.ones(n // p), torch.empty(n // p)
        return lambda: dist.all_to_all_single(out, x)
    raise ValueError(f"unknown collective {kind!r}")


def measure_collectives(comm, sizes: Sequence[int], repeats: int) -> dict[str, list[dict]]:
    """Seconds of each collective kind at each full-tensor size (busiest rank); empty on one device."""
    if comm.world_size == 1:
        return {}
    out: dict[str, list[dict]] = {}
    for kind in COLLECTIVES:
        rows = []
        for size in sizes:
            try:
                fn = _collective_fn(kind, size, comm.world_size)
                t = _max_over_ranks(comm, time_median(fn, comm, repeats))
            except RuntimeError:  # a backend without this collective (gloo builds differ): leave it to the link
                break
            rows.append({"bytes": size, "seconds": t})
        if rows:
            out[kind] = rows
    return out


def fit_alpha_beta(kind: str, p: int, samples: Sequence[dict]) -> dict:
    """Least-squares t = steps·α + bytes_per_device/β (ring formulas of the cost model), α ≥ 0."""
    from strategies.cost.formulas import Collective

    probe = Collective("fit", kind, 1.0)
    xs = [probe.bytes_per_device(p) * s["bytes"] for s in samples]
    ts = [s["seconds"] for s in samples]
    steps = probe.steps(p)
    if len(xs) == 1:
        return {"latency_us": 0.0, "bandwidth_gbs": xs[0] / ts[0] / 1e9}
    mx, mt = statistics.fmean(xs), statistics.fmean(ts)
    slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sum((x - mx) ** 2 for x in xs)
    intercept = mt - slope * mx
    if slope <= 0:  # noise swamped the size effect: all latency, bandwidth from the largest size
        slope = ts[-1] / xs[-1]
    if intercept < 0:
        intercept = 0.0
        slope = sum(x * t for x, t in zip(xs, ts)) / sum(x * x for x in xs)
    return {"latency_us": intercept / steps * 1e6, "bandwidth_gbs": 1 / slope / 1e9}


def measure_rank(comm, matrices: Sequence[torch.Tensor], attention_heads: tuple[int, int, int], spec: dict) -> dict:
    """Everything ``dynpart calibrate`` measures, run on every rank at once; every rank returns the same answer."""
    repeats = int(spec.get("repeats", 5))
    heads, kv_heads, head_dim = attention_heads
    return {
        "gemm": measure_gemm(comm, matrices, spec.get("rows", GEMM_ROWS), repeats),
        "attention": measure_attention(comm, heads, kv_heads, head_dim, spec.get("attention_lengths", ATTENTION_LENGTHS),
                                       repeats),
        **measure_memory(comm, repeats),
        "collectives": measure_collectives(comm, spec.get("collective_bytes", COLLECTIVE_BYTES), repeats),
    }


def build_profile(hardware: str, devices: int, measured: dict, dtype: str = "float32"):
    """A ``CalibrationProfile`` from ``measure_rank``'s answer (collectives fitted to α/β per kind)."""
    import datetime
    import socket

    from strategies.cost.hardware import CalibrationProfile

    return CalibrationProfile(
        hardware=hardware, devices=devices, dtype=dtype, bytes_per_element=torch.empty(0, dtype=getattr(torch, dtype))
        .element_size(), host=socket.gethostname(), created=datetime.datetime.now().isoformat(timespec="seconds"),
        gemm=tuple({"rows": g["rows"], "tflops": g["tflops"]} for g in measured["gemm"]),
        attention=tuple({"rows": a["length"], "tflops": a["tflops"]} for a in measured.get("attention", ())),
        memory_bandwidth_gbs=measured["memory_bandwidth_gbs"], launch_overhead_us=measured["launch_overhead_us"],
        collectives={k: fit_alpha_beta(k, devices, v) for k, v in measured["collectives"].items()},
    )


def calibrate_runner(runner, spec: dict) -> dict:
    """``measure_rank`` on a ``ShardRunner``'s own layer-0 shards and head counts (what its prefill multiplies)."""
    w = runner.weights
    flat = w.layers[0].flat
    matrices = [w.block(flat, name) for name in ("qkv", "o", "gate_up", "down")]
    heads = (w.layout.q_per_rank, w.layout.kv_per_rank, w.shape.head_dim)
    return measure_rank(runner.comm, matrices, heads, spec)
