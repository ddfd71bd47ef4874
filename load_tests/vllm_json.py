"""A load test's results in the JSON shape ``vllm bench serve --save-result`` writes, so runs compare with the tools
people already use on vLLM's files.

The keys are vLLM's: run metadata (``date``, ``backend``, ``model_id``, ``num_prompts``, ``request_rate``,
``burstiness``, ``max_concurrency``), totals and throughputs (``request_goodput`` is null without an SLO, as vLLM
leaves it without ``--goodput``), the per-request lists (``input_lens``, ``output_lens``, ``ttfts`` and ``itls`` in
seconds, ``errors``; ``generated_texts`` empty: the harness does not keep the text) and, per metric (ttft, tpot, itl,
e2el), ``mean_/median_/std_<metric>_ms`` and ``p<P>_<metric>_ms`` for each percentile asked. The arithmetic is
``load_tests.metrics``' (vLLM's definitions); the extra ``goodput_slo`` key says which SLO the goodput counted.
Failed requests count in ``errors`` only, as in vLLM.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np

from load_tests.metrics import SLO, RequestRecord

PERCENTILES = (50.0, 90.0, 99.0)


def _stats(name: str, values_ms: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    a = np.asarray(values_ms or [0.0], dtype=float)  # vLLM reports 0 for a metric with no samples
    out = {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
           f"std_{name}_ms": float(a.std())}
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        out[f"p{word}_{name}_ms"] = float(np.percentile(a, p))
    return out


def vllm_bench_result(records: list[RequestRecord], duration_s: float, slo: SLO | None = None, *, model: str,
                      backend: str = "openai", request_rate: float | None = None, burstiness: float = 1.0,
                      max_concurrency: int | None = None,
                      percentiles: tuple[float, ...] = PERCENTILES) -> dict:
    """The dict ``vllm bench serve`` saves, for these client-side records."""
    ok = [r for r in records if r.ok]
    total_in, total_out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    good = sum(slo.met(r) for r in ok) if slo is not None else None
    result: dict = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": backend,
        "model_id": model,
        "tokenizer_id": model,
        "num_prompts": len(records),
        "request_rate": "inf" if request_rate is None else request_rate,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        "duration": duration_s,
        "completed": len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": None if good is None else good / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "input_lens": [r.prompt_tokens for r in records],
        "output_lens": [r.output_tokens if r.ok else 0 for r in records],
        "ttfts": [r.ttft_s if r.ok else 0.0 for r in records],
        "itls": [r.itl_s if r.ok else [] for r in records],
        "generated_texts": ["" for _ in records],
        "errors": [r.error or ("" if r.ok else "incomplete") for r in records],
        "goodput_slo": None if slo is None else slo.model_dump(),
    }
    result |= _stats("ttft", [r.ttft_s * 1e3 for r in ok], percentiles)
    result |= _stats("tpot", [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None], percentiles)
    result |= _stats("itl", [x * 1e3 for r in ok for x in r.itl_s], percentiles)
    result |= _stats("e2el", [r.latency_s * 1e3 for r in ok], percentiles)
    return result
