"""Workloads for the simulator: built-in request mixes and CSV traces (arrival time, prompt and output length).

Built-ins are seeded, so a BENCHMARKS.md table is reproduced exactly by its command. Prompt plus output never
exceeds the model's context, as a real server would reject such a request before it reached an engine.

``bursty`` is what an autoscaler must cope with: the mixture's lengths, arriving as a gamma renewal process whose
squared coefficient of variation is ``burstiness`` (1: Poisson; 4: arrivals clumped into short bursts at the same
mean rate) under a rate that rises from ``trough`` × the peak to the peak (``rate``) and falls back over the run.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError


class Request(BaseModel):
    arrival_s: float = Field(ge=0)
    prompt_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=1)


SWEEP_LENGTHS = (128, 256, 512, 1024, 2048, 4032)  # 4032 + 64 output = Llama 2's 4096 context
BUILTIN = {  # name: (description, default rate req/s)
    "short-chat": ("chat turns: prompts lognormal median 200 tokens, outputs median 150", 4.0),
    "long-document": ("document QA/summaries: prompts 1K-4K tokens, outputs median 96", 0.5),
    "mixture": ("70% short-chat, 30% long-document", 2.0),
    "bursty": ("the mixture's lengths; gamma arrivals (burstiness = CV², 1 is Poisson) at a rate rising from 20% of "
               "--rate to --rate and falling back (sin²) over the run", 2.0),
    "length-sweep": (f"isolated requests (100 s apart) at prompt lengths {list(SWEEP_LENGTHS)}, 64 output tokens",
                     0.01),
}


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(median * math.exp(sigma * rng.gauss(0, 1))))))


def _chat(rng: random.Random) -> tuple[int, int]:
    return _lognormal(rng, 200, 0.8, 16, 2048), _lognormal(rng, 150, 0.7, 8, 512)


def _document(rng: random.Random) -> tuple[int, int]:
    return rng.randint(1024, 3968), _lognormal(rng, 96, 0.5, 16, 256)


def bursty_arrivals(requests: int, peak_rate: float, burstiness: float = 1.0, trough: float = 0.2,
                    rng: random.Random | None = None) -> list[float]:
    """Arrival times of a gamma renewal process (CV² = ``burstiness``) in operational time, mapped onto a rate
    r(t) = peak·(trough + (1 − trough)·sin²(πt/T)) whose run T is set so that ``requests`` arrive in it (the mean
    rate is peak·(1 + trough)/2). Each draw is mapped by a midpoint step of the rate, exact enough at these rates."""
    if peak_rate <= 0 or requests < 1 or burstiness <= 0 or not 0 < trough <= 1:
        raise ValueError("bursty needs a positive rate, request count and burstiness, and 0 < trough <= 1")
    rng = rng or random.Random(0)
    span = requests / (peak_rate * (1 + trough) / 2)

    def rate(t: float) -> float:
        return peak_rate * (trough + (1 - trough) * math.sin(math.pi * min(t, span) / span) ** 2)

    shape, t, out = 1 / burstiness, 0.0, []
    for _ in range(requests):
        g = rng.gammavariate(shape, burstiness)  # mean 1, variance = burstiness
        t += g / rate(t + 0.5 * g / rate(t))
        out.append(t)
    return out


def builtin_workload(name: str, requests: int = 400, rate: float | None = None, seed: int = 0,
                     context: int = 4096, burstiness: float = 1.0) -> list[Request]:
    """``requests`` Poisson arrivals at ``rate`` req/s (default: the workload's) drawn from a built-in mix;
    ``bursty``: gamma arrivals of ``burstiness`` under a rising and falling rate that peaks at ``rate``."""
    if name not in BUILTIN:
        raise ValueError(f"unknown workload {name!r}: use a CSV file or one of {sorted(BUILTIN)}")
    if name == "length-sweep":
        return [Request(arrival_s=100.0 * i, prompt_tokens=min(n, context - 64), output_tokens=64)
                for i, n in enumerate(SWEEP_LENGTHS)]
    rate = rate or BUILTIN[name][1]
    if rate <= 0 or requests < 1:
        raise ValueError("rate and request count must be positive")
    rng, t, out = random.Random(seed), 0.0, []
    arrivals = bursty_arrivals(requests, rate, burstiness, rng=random.Random(seed + 1)) if name == "bursty" else None
    for i in range(requests):
        t = arrivals[i] if arrivals else t + rng.expovariate(rate)
        kind = name if name == "short-chat" or name == "long-document" else (
            "short-chat" if rng.random() < 0.7 else "long-document")
        prompt, output = (_chat if kind == "short-chat" else _document)(rng)
        out.append(Request(arrival_s=t, prompt_tokens=min(prompt, context - output), output_tokens=output))
    return out


def load_trace(path: str | Path, rate: float | None = None) -> list[Request]:
    """A CSV with columns arrival_s, prompt_tokens, output_tokens; ``rate`` rescales arrivals to that mean rate."""
    try:
        with open(path, newline="") as f:
            reqs = sorted((Request(**row) for row in csv.DictReader(f)), key=lambda r: r.arrival_s)
    except FileNotFoundError:
        raise ValueError(f"workload {str(path)!r} is neither a file nor one of {sorted(BUILTIN)}") from None
    except (ValidationError, TypeError) as e:
        raise ValueError(f"{path}: rows need arrival_s,prompt_tokens,output_tokens: {e}") from e
    if not reqs:
        raise ValueError(f"{path} holds no requests")
    if rate and len(reqs) > 1 and reqs[-1].arrival_s > reqs[0].arrival_s:
        scale = (len(reqs) - 1) / rate / (reqs[-1].arrival_s - reqs[0].arrival_s)
        reqs = [r.model_copy(update={"arrival_s": (r.arrival_s - reqs[0].arrival_s) * scale}) for r in reqs]
    return reqs


def workload(spec: str, requests: int = 400, rate: float | None = None, seed: int = 0,
             context: int = 4096, burstiness: float = 1.0) -> list[Request]:
    """A built-in name or a CSV path."""
    if spec in BUILTIN:
        return builtin_workload(spec, requests, rate, seed, context, burstiness)
    return load_trace(spec, rate)
