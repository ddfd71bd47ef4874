"""Measure this machine for the cost model, inside the shard workers that will run the model.

``measure_rank`` runs on every rank at once (``ShardWorker.calibrate``), so each measurement sees what a real
prefill sees: p workers, each with its share of the cores, busy at the same time. It times
- the rank's own layer matrices (its Megatron shards of QKV, O, gate/up, down) at a range of token rows: achieved
  FLOP/s by rows, the curve the planner's roofline uses instead of a guessed efficiency;
- scaled-dot-product causal attention, the quadratic part of a prefill, as FLOP/s by sequence length;
- a large elementwise kernel (memory bandwidth) and a tiny one (per-kernel overhead κ);
- all-reduce, all-gather, reduce-scatter and all-to-all over a range of sizes, fitted to t = steps·α + bytes/β with
  the same ring formulas the cost model uses (``cost.formulas``).
``cost.fit.build_profile`` turns the ranks' answers into the ``CalibrationProfile`` that ``get_hardware`` applies.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist


GEMM_ROWS = (1, 4, 16, 64, 256, 1024, 4096)
ATTENTION_LENGTHS = (16, 64, 256, 1024, 4096)
COLLECTIVE_BYTES = (16 * 2**10, 128 * 2**10, 2**20, 4 * 2**20, 16 * 2**20)  # the engine's range, T·E·b and weights
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def relative_spread(samples: Sequence[float]) -> float:
    """The noise of repeated timings as a fraction of their median: 1.4826 × median absolute deviation / median
    (σ for normal noise, not moved by one disturbed repeat); 0 for fewer than two."""
    if len(samples) < 2:
        return 0.0
    med = statistics.median(samples)
    return 1.4826 * statistics.median(abs(x - med) for x in samples) / med if med > 0 else 0.0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Interference:
    """How many cores processes other than ours used during a measurement (from /proc: all busy CPU time minus that
    of our own processes). On a shared machine this is what separates a clean repeat from a disturbed one."""

    def __init__(self, pids: Sequence[int] = ()):
        self.pids = sorted({os.getpid(), *pids})
        self.tick = os.sysconf("SC_CLK_TCK")

    def _busy(self) -> tuple[float, float]:
        """(busy CPU seconds of the whole machine, CPU seconds of our processes)."""
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:8]]
            ours = 0
            for pid in self.pids:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ours += int(fields[11]) + int(fields[12])  # utime + stime, all threads
        except OSError:  # not Linux, or a process gone: no measurement, count as clean
            return 0.0, 0.0
        return (sum(v) - v[3] - v[4]) / self.tick, ours / self.tick

    def run(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(seconds fn took, average cores used by others meanwhile)."""
        b0, o0 = self._busy()
        t = timed(fn)
        b1, o1 = self._busy()
        return t, max(0.0, (b1 - b0) - (o1 - o0)) / max(t, 1e-3)

    def wait_quiet(self, cores: float = 0.2, window_s: float = 0.3, timeout_s: float = 30.0) -> bool:
        """Wait (up to ``timeout_s``) for a window in which others use less than ``cores``."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.run(lambda: time.sleep(window_s))[1] < cores:
                return True
        return False


@dataclass
class Timer:
    """Times a step run on every rank at once: median of clean repeats, the busiest rank's figure.

    Every rank starts each repeat together (barrier). Repeats disturbed by other processes (more than
    ``max_interference`` cores used by others meanwhile) are retried until each rank has ``repeats`` clean ones, or
    ``budget_s`` is spent (then at least 3 repeats). All ranks agree when to stop (an all-reduce), so their barriers
    and collectives stay matched."""

    comm: object
    repeats: int = 5
    meter: Interference | None = None
    budget_s: float = 4.0
    max_interference: float = 0.25
    statistic: str = "median"  # "min" for compute kernels: their undisturbed speed (as ``timeit`` advises)
    quiet_wait_s: float = 0.0  # before a measurement, and after a disturbed repeat, wait this long at most for quiet
    spreads: list[float] = field(default_factory=list)  # each measurement's ``relative_spread`` (copies share it)

    def _max(self, values: list[float]) -> list[float]:
        if self.comm.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def __call__(self, fn: Callable[[], object], warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        clean: list[float] = []
        every: list[float] = []
        disturbed = True
        while True:
            if disturbed and self.meter is not None and self.quiet_wait_s > 0:
                self.meter.wait_quiet(window_s=0.1, timeout_s=self.quiet_wait_s)
            if self.comm.world_size > 1:
                dist.barrier()
            t, others = self.meter.run(fn) if self.meter is not None else (timed(fn), 0.0)
            every.append(t)
            disturbed = others >= self.max_interference
            if not disturbed:
                clean.append(t)
            slowest, fewest_clean = self._max([sum(every), -len(clean)])
            if -fewest_clean >= self.repeats or len(every) >= 4 * self.repeats or (
                    slowest > self.budget_s and len(every) >= 3):
                break
        pick = min if self.statistic == "min" else statistics.median
        value, spread = self._max([pick(clean or every), relative_spread(clean or every)])
        self.spreads.append(spread)
        return value


def measure_gemm(timer: Timer, matrices: Sequence[torch.Tensor], rows: Sequence[int]) -> list[dict]:
    """Achieved TFLOP/s of X[rows, K]·Wᵀ summed over the rank's layer matrices (W: [N, K], as stored)."""
    out = []
    for r in rows:
        xs = [torch.randn(r, w.shape[1], dtype=w.dtype) for w in matrices]

        def step():
            for x, w in zip(xs, matrices):
                x @ w.T

        t = timer(step)
        flops = sum(2 * r * w.shape[0] * w.shape[1] for w in matrices)
        out.append({"rows": r, "tflops": flops / t / 1e12, "seconds": t})
    return out


def measure_attention(timer: Timer, heads: int, kv_heads: int, head_dim: int, lengths: Sequence[int],
                      dtype: torch.dtype = torch.float32) -> dict[str, list[dict]]:
    """The engine's attention (``strategies.layers.causal_attention``) on this rank's heads, as FLOP/s the cost model
    counts: ``causal``, one sequence of n tokens (4·pairs·heads·dh, keyed by n); and, on p > 1, ``sharded``, the
    busiest rank's zigzag token shard, counted as 1/p of the pairs and keyed by n/p. Every rank scores 1/p of the
    pairs, but rank 0's first chunk (0) is the square causal block SDPA skips the upper half of, while every other
    rank r attends both its chunks (r and 2p−1−r, n/(2p) queries each, every head) through a mask over all earlier
    keys: (2p+1)/(2p) of its pairs computed. Rank 1's pair of chunks is timed: the step waits for it."""
    from strategies.layers import causal_attention

    p = timer.comm.world_size
    out: dict[str, list[dict]] = {"causal": [], "sharded": []}
    for n in lengths:
        pairs = n * (n + 1) // 2
        q, k, v = (torch.randn(n, h, head_dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
        t = timer(lambda: causal_attention(q, k, v, 0, head_dim ** -0.5))
        out["causal"].append({"rows": n, "tflops": 4 * pairs * heads * head_dim / t / 1e12, "seconds": t})
        if p > 1:
            c = -(-n // (2 * p))
            qs = torch.randn(c, heads * p, head_dim, dtype=dtype)  # every head, one chunk's queries
            ks, vs = (torch.randn(2 * p * c, kv_heads * p, head_dim, dtype=dtype) for _ in range(2))

            def zigzag() -> None:  # rank 1: chunk 1 sees keys up to its end, chunk 2p−2 those up to its end
                for chunk in (1, 2 * p - 2):
                    causal_attention(qs, ks[:(chunk + 1) * c], vs[:(chunk + 1) * c], chunk * c, head_dim ** -0.5)

            t = timer(zigzag)
            counted = 4 * pairs / p * heads * p * head_dim
            out["sharded"].append({"rows": 2 * c, "tflops": counted / t / 1e12, "seconds": t})
    return out


def measure_memory(timer: Timer, mbytes: int = 64) -> dict:
    """Memory bandwidth (x += y over ``mbytes`` MiB tensors: 3 passes) and per-kernel overhead (a 1-element add)."""
    n = mbytes * 2**20 // 4
    x, y = torch.ones(n), torch.ones(n)
    t_big = timer(lambda: x.add_(y))
    a, b = torch.ones(1), torch.ones(1)

    def tiny():
        for _ in range(100):
            a.add_(b)

    t_tiny = timer(tiny) / 100
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


def measure_collectives(timer: Timer, sizes: Sequence[int]) -> dict[str, list[dict]]:
    """Seconds of each collective kind at each full-tensor size (busiest rank); empty on one device."""
    comm = timer.comm
    if comm.world_size == 1:
        return {}
    out: dict[str, list[dict]] = {}
    for kind in COLLECTIVES:
        rows = []
        for size in sizes:
            try:
                fn = _collective_fn(kind, size, comm.world_size)
                t = timer(fn)
            except RuntimeError:  # a backend without this collective (gloo builds differ): leave it to the link
                break
            rows.append({"bytes": size, "seconds": t})
        if rows:
            out[kind] = rows
    return out


def measure_overlap(timer: Timer, matrices: Sequence[torch.Tensor], flat: torch.Tensor, rows: int = 256) -> dict:
    """How much of a prefetched weight all-gather hides behind compute, as ``weight_gathered`` overlaps them:
    (t_gemm + t_gather − t_both) / min(t_gemm, t_gather), clipped to [0, 1]. 1 on GPUs (copy engines); on a CPU whose
    cores all compute, the gather's copies need those same cores, so less."""
    comm = timer.comm
    if comm.world_size == 1:
        return {"prefetch_overlap": 1.0}
    xs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for w in matrices]
    out = torch.empty((comm.world_size, flat.numel()), dtype=flat.dtype)

    def gemms():
        for x, w in zip(xs, matrices):
            x @ w.T

    def gather():
        return comm.all_gather_async(flat, out=out)

    t_c = timer(gemms)
    t_w = timer(lambda: gather().wait())

    def both():
        pending = gather()
        gemms()
        pending.wait()

    t_b = timer(both)
    hidden = (t_c + t_w - t_b) / min(t_c, t_w)
    return {"prefetch_overlap": min(1.0, max(0.0, hidden)), "overlap_seconds": {"gemm": t_c, "gather": t_w,
                                                                                   "both": t_b}}


def measure_rank(comm, matrices: Sequence[torch.Tensor], attention_heads: tuple[int, int, int], spec: dict,
                 flat: torch.Tensor | None = None) -> dict:
    """Everything ``dynpart calibrate`` measures, run on every rank at once; every rank returns the same answer."""
    heads, kv_heads, head_dim = attention_heads
    timer = Timer(comm, int(spec.get("repeats", 5)), Interference(spec.get("pids", ())),
                  quiet_wait_s=float(spec.get("quiet_wait", 0)))
    kernels = replace(timer, statistic="min")  # a shared machine only ever slows a kernel down
    out = {
        "gemm": measure_gemm(kernels, matrices, spec.get("rows", GEMM_ROWS)),
        "attention": measure_attention(kernels, heads, kv_heads, head_dim,
                                       spec.get("attention_lengths", ATTENTION_LENGTHS)),
        **measure_memory(kernels),
        # collectives are short and their latency is noisy on a shared machine: many more repeats
        "collectives": measure_collectives(replace(timer, repeats=max(20, 4 * timer.repeats), budget_s=2.0),
                                           spec.get("collective_bytes", COLLECTIVE_BYTES)),
        **(measure_overlap(kernels, matrices, flat) if flat is not None else {}),
    }
    return out | {"spread": statistics.median(timer.spreads)}  # the typical noise of one measurement


def local_forward_time(runner, timer: Timer, tokens: int = 1) -> float:
    """Seconds of this rank's share of a megatron forward of ``tokens`` tokens with every collective skipped
    (``SingleDevice``): the compute and per-op overhead of a step, without communication (results are not used)."""
    from strategies.comm import SingleDevice
    from strategies.executor import LayoutPass
    from strategies.kv_cache import Chunk, PackedChunks
    from strategies.layers import lm_head_logits
    from strategies.layout import MEGATRON

    blocks = list(range(-(-tokens // runner.block_size)))  # written, never read by a sequence
    batch = PackedChunks.build([Chunk([0] * tokens, 0, blocks)], runner.block_size, runner.device)
    cos, sin = runner.rotary(batch.positions, runner.dtype)
    local = SingleDevice()

    def step():
        with torch.inference_mode():
            run = LayoutPass(MEGATRON, runner.weights, local, runner.cache, batch, cos, sin)
            h = run.run(runner.sources.layers(MEGATRON))
            lm_head_logits(local, runner.weights.lm_head, h[-1:], runner.shape.vocab_size)

    return timer(step)


def calibrate_runner(runner, spec: dict) -> dict:
    """``measure_rank`` on a ``ShardRunner``'s own layer-0 shards and head counts (what its prefill multiplies)."""
    w = runner.weights
    flat = w.layers[0].flat
    matrices = [w.block(flat, name) for name in ("qkv", "o", "gate_up", "down")]
    heads = (w.layout.q_per_rank, w.layout.kv_per_rank, w.shape.head_dim)
    out = measure_rank(runner.comm, matrices, heads, spec, flat=flat)
    out["local_step"] = local_forward_time(runner, Timer(runner.comm, int(spec.get("repeats", 5)),
                                                         Interference(spec.get("pids", ())), statistic="min",
                                                         quiet_wait_s=float(spec.get("quiet_wait", 0))))
    return out
