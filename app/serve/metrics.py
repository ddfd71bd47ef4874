"""Prometheus metrics through Ray (``ray.serve.metrics``: Serve adds deployment/replica/application tags).

Exported on each node's Ray metrics endpoint (``ray start --metrics-export-port``; scraped by Prometheus):
``dynpart_requests_total`` {pool, strategy, status}, ``dynpart_ttft_seconds``, ``dynpart_tpot_seconds`` and
``dynpart_prefill_seconds`` histograms {pool, strategy}, ``dynpart_queued_tokens`` {pool} per engine replica, and
``dynpart_expected_wait_seconds`` {pool} per ingress (what admission control compares with ``max_queue_wait_s``),
``dynpart_retries_total`` {pool}: requests started again elsewhere after their replica in ``pool`` failed;
``dynpart_prediction_error`` {pool, layout} per engine replica: how far its steps' measured times were from the
corrected predictions (mean |measured / predicted - 1| over the steps since the last report);
``dynpart_desired_replicas`` and ``dynpart_predicted_ttft_seconds`` {application, pool} from Serve's controller, where
a pool's ``slo`` autoscaling policy runs.
``pool`` is always a configured pool's name, or for a request refused before one was chosen ``none`` (it named none)
or ``unknown`` (it named one this app does not have): a client cannot add series by naming pools.
"""

from __future__ import annotations

from functools import cache

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


@cache
def _ingress_metrics():
    from ray.serve.metrics import Counter, Histogram

    tags = ("pool", "strategy")
    return (
        Counter("dynpart_requests_total", "Requests answered, by pool, prefill strategy and status",
                tag_keys=(*tags, "status")),
        Histogram("dynpart_ttft_seconds", "Time to first token", boundaries=LATENCY_BOUNDS, tag_keys=tags),
        Histogram("dynpart_tpot_seconds", "Time per output token after the first", boundaries=LATENCY_BOUNDS,
                  tag_keys=tags),
        Histogram("dynpart_prefill_seconds", "Prefill forward time", boundaries=LATENCY_BOUNDS, tag_keys=tags),
    )


@cache
def _queued_gauge():
    from ray.serve.metrics import Gauge

    return Gauge("dynpart_queued_tokens", "Prompt tokens waiting for prefill in this replica", tag_keys=("pool",))


@cache
def _wait_gauge():
    from ray.serve.metrics import Gauge

    return Gauge("dynpart_expected_wait_seconds", "A new request's expected wait before prefill, as the ingress "
                 "last estimated it for admission", tag_keys=("pool",))


@cache
def _replicas_gauge():
    from ray.serve.metrics import Gauge

    return Gauge("dynpart_replicas", "Replicas of each of the app's deployments by state (STARTING for long: "
                 "waiting for resources the cluster does not have); Serve's own ``deployment`` tag names the board",
                 tag_keys=("serve_deployment", "state"))


def set_replicas(deployment: str, state: str, count: int) -> None:
    _replicas_gauge().set(count, tags={"serve_deployment": deployment, "state": state})


def set_expected_wait(pool: str, seconds: float) -> None:
    _wait_gauge().set(seconds, tags={"pool": pool})


def record_request(pool: str, strategy: str | None, status: str, ttft_s: float | None = None,
                   tpot_s: float | None = None, prefill_s: float | None = None) -> None:
    requests, ttft, tpot, prefill = _ingress_metrics()
    tags = {"pool": pool, "strategy": strategy or "none"}
    requests.inc(tags={**tags, "status": status})
    for hist, value in ((ttft, ttft_s), (tpot, tpot_s), (prefill, prefill_s)):
        if value is not None:
            hist.observe(value, tags=tags)


@cache
def _retries_counter():
    from ray.serve.metrics import Counter

    return Counter("dynpart_retries_total", "Requests started again elsewhere because their replica in this pool "
                   "failed before they produced a token", tag_keys=("pool",))


def record_retry(pool: str) -> None:
    _retries_counter().inc(tags={"pool": pool})


def set_queued_tokens(pool: str, tokens: int) -> None:
    _queued_gauge().set(tokens, tags={"pool": pool})


@cache
def _kv_gauges():
    from ray.serve.metrics import Gauge

    return (Gauge("dynpart_prefix_cache_hit_rate", "Prompt tokens found in this replica's prefix cache, of all "
                  "looked up", tag_keys=("pool",)),
            Gauge("dynpart_kv_blocks_used", "KV cache blocks held by running sequences in this replica",
                  tag_keys=("pool",)),
            Gauge("dynpart_preemptions", "Sequences this replica preempted (and recomputed) for KV blocks so far",
                  tag_keys=("pool",)))


def set_kv_usage(pool: str, hit_rate: float, blocks_used: int, preemptions: int) -> None:
    hits, used, preempted = _kv_gauges()
    tags = {"pool": pool}
    hits.set(hit_rate, tags=tags)
    used.set(blocks_used, tags=tags)
    preempted.set(preemptions, tags=tags)


@cache
def _prediction_error_gauge():
    from ray.serve.metrics import Gauge

    return Gauge("dynpart_prediction_error", "Relative error of the cost model's corrected step-time predictions "
                 "against the measured steps, mean |measured / predicted - 1| since the last report",
                 tag_keys=("pool", "layout"))


def set_prediction_errors(pool: str, errors: dict[str, float]) -> None:
    gauge = _prediction_error_gauge()
    for layout, error in errors.items():
        gauge.set(error, tags={"pool": pool, "layout": layout})


def _autoscale_gauges():
    # ray.util.metrics, not ray.serve.metrics: these are set in Serve's controller (the slo policy), no replica there
    from ray.util.metrics import Gauge

    tags = ("application", "pool")
    return (Gauge("dynpart_desired_replicas", "Replicas the slo autoscaling policy last asked for", tag_keys=tags),
            Gauge("dynpart_predicted_ttft_seconds", "The slo policy's predicted TTFT percentile at the replica count "
                  "it asked for (capped at 1e6: overloaded)", tag_keys=tags))


def set_autoscale(application: str, pool: str, desired: int, predicted_ttft_s: float | None) -> None:
    desired_gauge, ttft_gauge = _autoscale_gauges()
    tags = {"application": application, "pool": pool}
    desired_gauge.set(desired, tags=tags)
    if predicted_ttft_s is not None:
        ttft_gauge.set(min(predicted_ttft_s, 1e6), tags=tags)
