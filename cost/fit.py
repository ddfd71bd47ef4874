"""Fit the cost model's parameters to what ``placement.calibrate`` measured: collectives to α/β by the ring formulas,
the per-op overhead κ and the per-collective sync to a timed decode step, all into one ``CalibrationProfile``.

The measuring needs the model math and the shard workers (``placement``); the fitting needs only the cost model, so it
lives beside it and is tested without starting a worker.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Sequence

from cost.formulas import Collective, Compute, Work, collective_time, compute_time
from cost.hardware import CalibrationProfile, Hardware, get_hardware
from cost.layouts import end_ops, layer_ops
from cost.search import STRATEGIES
from strategies.layout import check_devices
from strategies.shapes import ModelShape


def _relative_fit(xs: Sequence[float], ts: Sequence[float]) -> tuple[float, float]:
    """(a, b) minimising Σ((a + b·x − t)/t)²: relative errors, so sizes spanning decades weigh alike."""
    w = [1 / t**2 for t in ts]
    sw, sx, st = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * t for wi, t in zip(w, ts))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxt = sum(wi * x * t for wi, x, t in zip(w, xs, ts))
    slope = (sw * sxt - sx * st) / (sw * sxx - sx * sx)
    return (st - slope * sx) / sw, slope


def fit_alpha_beta(kind: str, p: int, samples: Sequence[dict]) -> dict:
    """Least-squares t = steps·α + bytes_per_device/β (ring formulas of the cost model), α ≥ 0."""
    probe = Collective("fit", kind, 1.0)
    xs = [probe.bytes_per_device(p) * s["bytes"] for s in samples]
    ts = [s["seconds"] for s in samples]
    steps = probe.steps(p)
    if len(xs) == 1:
        return {"latency_us": 0.0, "bandwidth_gbs": xs[0] / ts[0] / 1e9}
    intercept, slope = _relative_fit(xs, ts)
    if slope <= 0:  # noise swamped the size effect: all latency, bandwidth from the largest size
        slope = ts[-1] / xs[-1]
    if intercept < 0:  # through the origin, same weighting
        intercept = 0.0
        slope = sum(x / t for x, t in zip(xs, ts)) / sum((x / t) ** 2 for x, t in zip(xs, ts))
    return {"latency_us": intercept / steps * 1e6, "bandwidth_gbs": 1 / slope / 1e9}


def fit_overheads(shape: ModelShape, hw: Hardware, devices: int, context: int, local_s: float,
                  decode_s: float) -> tuple[float, float]:
    """(κ µs per compute op, sync µs per blocking collective) that make the cost model's megatron decode step take
    ``local_s`` without its collectives and ``decode_s`` with them.

    A one-token forward is almost all overhead: Python dispatch per op (κ; the tiny-kernel microbenchmark does not
    see it) and, between p ranks, waiting at each collective for the slowest rank plus the driver's call into the
    workers (sync), beyond the collectives' own α/β."""
    bare = hw.model_copy(update={"launch_overhead_us": 0.0, "sync_overhead_us": 0.0})
    padded = check_devices(shape, devices).padded_shape(shape)
    work, c, b, n = Work.decode([context]), STRATEGIES["megatron"], hw.bytes_per_element, shape.num_layers
    layer, end = layer_ops(c, padded, devices, work, b), end_ops(c, padded, devices, work, b)
    ops = [*layer * n, *end]
    computes = [o for o in ops if isinstance(o, Compute)]
    blocking = [o for o in ops if isinstance(o, Collective) and not o.prefetched]
    kappa = max(0.0, local_s - sum(compute_time(o, bare) for o in computes)) / len(computes)
    comm = sum(collective_time(o, bare, devices) for o in blocking)
    sync = max(0.0, decode_s - local_s - comm) / len(blocking) if blocking and devices > 1 else 0.0
    return max(hw.launch_overhead_us, kappa * 1e6), sync * 1e6


def measurement_spread(measured: dict) -> float | None:
    """The calibration's noise (relative): the larger of a typical measurement's spread and the timed decode step's
    (a whole forward, collectives included); None when neither was recorded."""
    found = [measured[k] for k in ("spread", "decode_spread") if measured.get(k) is not None]
    return max(found) if found else None


def build_profile(hardware: str, devices: int, measured: dict, bytes_per_element: int, dtype: str = "float32",
                  shape: ModelShape | None = None) -> CalibrationProfile:
    """A ``CalibrationProfile`` from ``measure_rank``'s answer (collectives fitted to α/β per kind); with the model
    ``shape``, a measured ``decode_step`` (seconds at ``decode_context``, from the driver) and ``local_step`` (the
    same step without collectives, inside the workers), κ and the sync overhead are fitted to them."""
    profile = CalibrationProfile(
        hardware=hardware, devices=devices, dtype=dtype, bytes_per_element=bytes_per_element,
        host=socket.gethostname(), created=datetime.datetime.now().isoformat(timespec="seconds"),
        gemm=tuple({"rows": g["rows"], "tflops": g["tflops"]} for g in measured["gemm"]),
        attention=tuple({"rows": a["rows"], "tflops": a["tflops"]} for a in measured["attention"]["causal"]),
        attention_sharded=tuple({"rows": a["rows"], "tflops": a["tflops"]} for a in measured["attention"]["sharded"]),
        memory_bandwidth_gbs=measured["memory_bandwidth_gbs"], launch_overhead_us=measured["launch_overhead_us"],
        prefetch_overlap=measured.get("prefetch_overlap"),
        collectives={k: fit_alpha_beta(k, devices, v) for k, v in measured["collectives"].items()},
        spread=measurement_spread(measured),
    )
    if shape is not None and measured.get("decode_step"):
        hw = get_hardware(hardware, use_profile=False).calibrated(profile)
        kappa, sync = fit_overheads(shape, hw, devices, measured["decode_context"], measured["local_step"],
                                    measured["decode_step"])
        profile = profile.model_copy(update={"launch_overhead_us": kappa, "sync_overhead_us": sync})
    return profile
