"""Workloads for the simulator: built-in request mixes and CSV traces (arrival time, prompt and output length).

Built-ins are seeded, so a BENCHMARKS.md table is reproduced exactly by its command. Prompt plus output never
exceeds the model's context, as a real server would reject such a request before it reached an engine.
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
    "length-sweep": (f"isolated requests (100 s apart) at prompt lengths {list(SWEEP_LENGTHS)}, 64 output tokens",
                     0.01),
}


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(median * math.exp(sigma * rng.gauss(0, 1))))))


def _chat(rng: random.Random) -> tuple[int, int]:
    return _lognormal(rng, 200, 0.8, 16, 2048), _lognormal(rng, 150, 0.7, 8, 512)


def _document(rng: random.Random) -> tuple[int, int]:
    return rng.randint(1024, 3968), _lognormal(rng, 96, 0.5, 16, 256)


def builtin_workload(name: str, requests: int = 400, rate: float | None = None, seed: int = 0,
                     context: int = 4096) -> list[Request]:
    """``requests`` Poisson arrivals at ``rate`` req/s (default: the workload's) drawn from a built-in mix."""
    if name not in BUILTIN:
        raise ValueError(f"unknown workload {name!r}: use a CSV file or one of {sorted(BUILTIN)}")
    if name == "length-sweep":
        return [Request(arrival_s=100.0 * i, prompt_tokens=min(n, context - 64), output_tokens=64)
                for i, n in enumerate(SWEEP_LENGTHS)]
    rate = rate or BUILTIN[name][1]
    if rate <= 0 or requests < 1:
        raise ValueError("rate and request count must be positive")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(requests):
        t += rng.expovariate(rate)
        kind = name if name != "mixture" else ("short-chat" if rng.random() < 0.7 else "long-document")
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
             context: int = 4096) -> list[Request]:
    """A built-in name or a CSV path."""
    if spec in BUILTIN:
        return builtin_workload(spec, requests, rate, seed, context)
    return load_trace(spec, rate)
