"""Serving metrics from client-side timings, with the definitions of ``vllm bench serve``.

- TTFT: request sent -> first content chunk received.
- TPOT: (latency - TTFT) / (output tokens - 1), per request (requests with one output token have none).
- ITL: every gap between consecutive content chunks, pooled over requests.
- E2E latency: request sent -> last byte.
- Throughput: completed requests and output tokens per second of the benchmark's wall time.
- Goodput: completed requests per second that meet every SLO given (TTFT, TPOT, E2E, in ms).
Percentiles are linear-interpolated (numpy's default), as vLLM reports them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from pydantic import BaseModel, Field


class RequestRecord(BaseModel):
    """What the client saw of one request."""

    prompt_tokens: int
    output_tokens: int = 0
    sent_s: float
    chunk_times_s: list[float] = Field(default_factory=list)  # arrival time of each content chunk
    done_s: float | None = None
    error: str | None = None  # kind of failure, e.g. "http_503", "timeout"; None on success
    pool: str | None = None
    strategy: str | None = None
    predicted_ttft_s: float | None = None  # the router's prediction for its pool (x-dynpart-predicted-ttft-ms)
    predicted_s: float | None = None  # … and for its last token (x-dynpart-predicted-ms)

    def named_by(self, headers) -> None:
        """Where the server ran it and what its router predicted there (dynpart's response headers; absent: None)."""
        self.pool, self.strategy = headers.get("x-dynpart-pool"), headers.get("x-dynpart-strategy")
        ms = {k: headers.get(f"x-dynpart-predicted{k}-ms") for k in ("-ttft", "")}
        self.predicted_ttft_s, self.predicted_s = (None if v is None else float(v) / 1e3 for v in ms.values())

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None and bool(self.chunk_times_s)

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] - self.sent_s

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s  # type: ignore[operator]

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return list(np.diff(self.chunk_times_s))


class Stat(BaseModel):
    mean: float
    p50: float
    p90: float
    p99: float
    n: int

    @classmethod
    def of(cls, values_ms: list[float]) -> "Stat | None":
        if not values_ms:
            return None
        a = np.asarray(values_ms, dtype=float)
        return cls(mean=float(a.mean()), p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                   p99=float(np.percentile(a, 99)), n=len(a))


class SLO(BaseModel):
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = [(self.ttft_ms, r.ttft_s), (self.tpot_ms, r.tpot_s or 0.0), (self.e2e_ms, r.latency_s)]
        return all(limit is None or value * 1e3 <= limit for limit, value in checks)


class Summary(BaseModel):
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float
    output_throughput: float
    goodput: float | None
    ttft_ms: Stat | None
    tpot_ms: Stat | None
    itl_ms: Stat | None
    e2e_ms: Stat | None


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None) -> Summary:
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "incomplete" for r in records if not r.ok)
    return Summary(
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(errors),
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s,
        output_throughput=sum(r.output_tokens for r in ok) / duration_s,
        goodput=None if slo is None else sum(slo.met(r) for r in ok) / duration_s,
        ttft_ms=Stat.of([r.ttft_s * 1e3 for r in ok]),
        tpot_ms=Stat.of([r.tpot_s * 1e3 for r in ok if r.tpot_s is not None]),
        itl_ms=Stat.of([x * 1e3 for r in ok for x in r.itl_s]),
        e2e_ms=Stat.of([r.latency_s * 1e3 for r in ok]),
    )


def summarize_by(records: list[RequestRecord], key: str, duration_s: float,
                 slo: SLO | None = None) -> dict[str, Summary]:
    """One summary per pool or per strategy (from the response headers)."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(str(getattr(r, key)), []).append(r)
    return {k: summarize(v, duration_s, slo) for k, v in sorted(groups.items())}
