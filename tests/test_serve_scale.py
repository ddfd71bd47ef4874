"""An engine deployment autoscales on Serve's ``autoscaling_config``: up under load, back down when idle."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import delete_app, metric_samples, run_app

APP = "serve-scale"


def replicas(deployment: str, state: str | None = None) -> int:
    """The deployment's replicas in ``state`` (RUNNING, ...; None: in any state, starting and stopping included)."""
    from app.serve.serve_status import app_states

    states = app_states()[APP].deployments[deployment].replica_states
    return sum(states.values()) if state is None else states.get(state, 0)


def running(deployment: str) -> int:
    return replicas(deployment, "RUNNING")


def board_loads(pool: str) -> list:
    """The loads the app's board holds for ``pool`` (what every ingress prices it by)."""
    from ray import serve

    return serve.get_deployment_handle("LoadBoard", APP).view.remote().result(timeout_s=10).loads.get(pool, [])


def slo_decisions(ray_session, pool: str) -> list[str]:
    """The slo policy's decisions for ``pool`` as the Serve controller logged them (each with its reason)."""
    import glob
    import os

    logs = glob.glob(os.path.join(ray_session._private.worker._global_node.get_logs_dir_path(), "serve",
                                  "controller_*.log"))
    return [line for path in logs for line in open(path) if f"slo policy, pool {pool}:" in line]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_engine_deployment_scales_up_under_load_and_back_down(serve_session, chat_tiny):
    from ray import serve

    from app.serve.app import build_app

    pool = dict(name="auto", devices=1, max_num_seqs=2, max_model_len=512,
                autoscaling=dict(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1,
                                 downscale_delay_s=2, look_back_period_s=2, metrics_interval_s=0.5))
    run_app(build_app({"model": chat_tiny, "pools": [pool], "graceful_shutdown_s": 1, "shared_weights": False}), APP,
            "/scale")
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_session['http']}/scale", timeout=120) as c:
            while not stop.is_set():
                c.post("/v1/completions", json={"model": chat_tiny, "prompt": "Hi", "max_tokens": 64,
                                                "ignore_eos": True})

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    try:
        assert running("auto") == 1
        for t in threads:
            t.start()
        assert wait_for(lambda: running("auto") == 2, 60), serve.status().applications[APP]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        assert wait_for(lambda: running("auto") == 1, 60), serve.status().applications[APP]
    finally:
        delete_app(APP)


@pytest.mark.slow
def test_a_pool_scaled_to_zero_is_idle_not_lost_and_its_first_request_starts_a_replica(serve_session, ray_session,
                                                                                       chat_tiny):
    """A pool at zero replicas by its autoscaler (the slo policy, back to min_replicas 0 once idle past its delay):
    ``/health`` is ``ok`` and says it is idle (not lost, not
    starting); a request sent there is answered 200 once a replica has started for it (the cold start measured and
    reported); back at zero after idling, the next request is answered 200 as well."""
    from app.serve.app import build_app

    pool = dict(name="zero", devices=1, max_num_seqs=2, max_model_len=512, slo=dict(ttft_s=5.0, tpot_s=0.5),
                autoscaling=dict(policy="slo", min_replicas=0, initial_replicas=0, max_replicas=1, cold_start_s=10,
                                 downscale_delay_s=2, look_back_period_s=1, metrics_interval_s=0.5))
    run_app(build_app({"model": chat_tiny, "pools": [pool], "graceful_shutdown_s": 1, "shared_weights": False,
                       "request_timeout_s": 120}), APP, "/zero")
    body = {"model": chat_tiny, "prompt": "Hi", "max_tokens": 4}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_session['http']}/zero", timeout=120) as c:
            def health() -> dict:
                return c.get("/health").json()

            assert wait_for(lambda: health()["status"] == "ok", 20), health()
            assert health()["pools"]["zero"]["idle"] and running("zero") == 0, health()
            for attempt in ("cold", "cold again"):
                t0 = time.monotonic()
                r = c.post("/v1/completions", json=body)
                print(f"{attempt}: {r.status_code} in {time.monotonic() - t0:.1f} s")
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 4
                # the stopped replica took its load off the board as it went, not STALE_S after its last report
                assert wait_for(lambda: replicas("zero") == 0, 60), health()
                assert wait_for(lambda: not board_loads("zero"), 1.5), board_loads("zero")
                # idle again, and the board measured the start from zero
                assert wait_for(lambda: running("zero") == 0 and health()["pools"]["zero"]["idle"], 60), health()
                state = health()
                assert state["status"] == "ok" and not state["pools"]["zero"]["lost"], state
                assert state["pools"]["zero"]["cold_start_s"] > 0, state
                print("health while idle:", state["pools"]["zero"])
    finally:
        delete_app(APP)
    # Serve starts the replica for a request waiting at a pool with none (before asking the policy); the slo policy
    # keeps it while it serves and takes the pool back to zero once idle past its delay, both times
    decisions = slo_decisions(ray_session, "zero")
    assert sum("1 -> 0 replicas: idle: min_replicas 0" in line for line in decisions) >= 2, decisions


def test_slo_keys_need_the_slo_policy_and_turn_serves_delays_off():
    from pydantic import ValidationError

    from app.serve.config import PoolConfig

    with pytest.raises(ValidationError, match="only read by the slo autoscaling policy"):
        PoolConfig(name="p", slo={"ttft_s": 1.0})
    with pytest.raises(ValidationError, match="ttft_slo_s"):  # a misspelt objective is not the default silently
        PoolConfig(name="p", autoscaling={"policy": "slo"}, slo={"ttft_slo_s": 1.0})
    pool = PoolConfig(name="p", autoscaling={"policy": "slo", "max_replicas": 3, "downscale_delay_s": 9,
                                             "look_back_period_s": 5})
    assert pool.slo.ttft_s == 1.0 and pool.slo.percentile == 0.9  # the policy's defaults
    serve_keys = pool.deployment_options("p", pool.bundle(), 1.0)["autoscaling_config"]
    assert serve_keys["upscale_delay_s"] == serve_keys["downscale_delay_s"] == 0  # the policy's cooldown is its own
    assert "policy" not in serve_keys and "cold_start_s" not in serve_keys and serve_keys["look_back_period_s"] == 5
    with pytest.raises(ValidationError, match="grow is only read by the slo autoscaling policy"):
        PoolConfig(name="p", autoscaling={"grow": "cheapest"})
    assert "grow" not in PoolConfig(name="p", autoscaling={"policy": "slo", "grow": "cheapest"}).autoscaling \
        .serve_config()
    default = PoolConfig(name="d", autoscaling={"max_replicas": 3})
    assert default.slo is None and default.autoscaling.serve_config()["downscale_delay_s"] == 60  # as before


def test_the_replicas_counters_read_back_as_the_requests_of_the_window():
    """Cumulative counters sampled each 1 s: the arrivals between two samples spread over that second with its mean
    prompt length; outputs at the mean generated length; queues summed with the handles'."""
    from types import SimpleNamespace

    from app.serve.slo_policy import read_window

    def series(*values, start=100.0):
        return [SimpleNamespace(timestamp=start + i, value=v) for i, v in enumerate(values)]

    raw = {"arrivals": {"a": series(0, 2, 2), "b": series(5, 6, start=101.0)},
           "prompt_tokens": {"a": series(0, 200, 200), "b": series(50, 80, start=101.0)},
           "max_tokens": {"a": series(0, 64, 64), "b": series(10, 42, start=101.0)},
           "finished": {"a": series(0, 1, 2), "b": series(0, 0, start=101.0)},
           "output_tokens": {"a": series(0, 10, 30), "b": series(0, 0, start=101.0)},
           "waiting": {"a": series(0, 1, 2), "b": series(3, 1, start=101.0)},
           "step_s": {"a": series(0.1, 0.1, 0.2), "b": series(0.4, 0.4, start=101.0)}}
    window, measured = read_window(raw, now_s=102.0, look_back_s=30.0, queued_in_handles=4)
    assert sorted(window.arrivals_s) == [-1.5, -1.0, 0.0] and window.span_s == 2.0
    assert sorted(window.prompt_tokens) == [30, 100, 100] and window.output_tokens == [15, 15, 15]
    assert window.queued == 2 + 1 + 4 and measured.step_s == pytest.approx(0.3)


def test_pools_that_grow_cheapest_hand_their_growth_to_the_sibling_that_carries_it_for_less():
    """Two ``grow: cheapest`` pools of one app, as Serve's controller calls their policies: the busy one, at 30
    req/s on one replica, holds while its sibling, half as fast for a tenth of the price, grows for its overflow;
    each logs why. A pool on its own (``grow: own``) grows itself."""
    import io
    import logging
    import re
    from types import SimpleNamespace

    from test_autoscale import PROFILE, SETTINGS, SLO

    from app.serve import slo_policy

    def ctx(app: str, rate: float, now: float = 1000.0):
        ts = [now - 30 + i for i in range(31)]

        def series(per_request: float):
            return {"r1": [SimpleNamespace(timestamp=t, value=rate * per_request * i) for i, t in enumerate(ts)]}

        raw = {"arrivals": series(1), "prompt_tokens": series(500), "max_tokens": series(100), "finished": series(1),
               "output_tokens": series(100)}
        return SimpleNamespace(current_time=now, raw_metrics=raw, total_queued_requests=0, policy_state={},
                               target_num_replicas=1, app_name=app)

    def policy(name: str, profile, price: float, grow: str = "cheapest"):
        return slo_policy.SLOPolicy(name, profile.model_dump(mode="json"), SLO.model_dump(),
                                    SETTINGS.model_dump(), grow=grow, context_tokens=8000,
                                    price_per_replica_hour=price)

    half = PROFILE.calibrated(prefill_speed=2.0, decode_speed=2.0)
    busy, cheap = policy("busy", PROFILE, 4.0), policy("cheap", half, 0.4)
    cheap(ctx("grow-app", 1.0))  # the sibling's view is in the controller's registry
    log, said = logging.getLogger("ray.serve"), io.StringIO()
    handler, level = logging.StreamHandler(said), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        assert busy(ctx("grow-app", 30.0))[0] == 1
        grown, _ = cheap(ctx("grow-app", 1.0))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert grown > 1
    assert "pool busy: 1 -> 1 replicas: hold: pool cheap takes this pool's overflow" in said.getvalue()
    assert re.search(rf"pool cheap: 1 -> {grown} replicas: up: \+\d+ for pool busy's overflow", said.getvalue())
    alone = policy("busy", PROFILE, 4.0, grow="own")
    assert alone(ctx("own-app", 30.0))[0] > 1


@pytest.mark.slow
def test_a_burst_scales_a_pool_with_the_slo_policy_up_and_back_down(serve_session, ray_session, chat_tiny):
    """A pool sized by the slo policy: 8 closed-loop clients on 4 slots per replica make one replica predict an
    overload (and queue at the handle), so it scales to 2 while the burst lasts and back to 1 after it; the controller
    logs each decision with its reason and exports the desired count and the predicted TTFT."""
    from ray import serve

    from app.serve.app import build_app

    pool = dict(name="slo", devices=1, max_num_seqs=4, max_model_len=512, slo=dict(ttft_s=0.5, tpot_s=0.2),
                autoscaling=dict(policy="slo", min_replicas=1, max_replicas=2, cold_start_s=10, downscale_delay_s=3,
                                 look_back_period_s=4, metrics_interval_s=0.5))
    run_app(build_app({"model": chat_tiny, "pools": [pool], "graceful_shutdown_s": 1, "shared_weights": False}), APP,
            "/slo")

    def gauge(name: str) -> float | None:
        return next((s.value for s in metric_samples(ray_session, f"ray_{name}")
                     if s.name == f"ray_{name}" and s.labels.get("application") == APP
                     and s.labels.get("pool") == "slo"), None)

    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_session['http']}/slo", timeout=120) as c:
            while not stop.is_set():
                c.post("/v1/completions", json={"model": chat_tiny, "prompt": "The quick brown fox jumps " * 8,
                                                "max_tokens": 48, "ignore_eos": True})

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    t0 = time.monotonic()
    try:
        assert running("slo") == 1
        for t in threads:
            t.start()
        # the policy asks for the second replica within 15 s of the burst (its prediction passing the SLO), and
        # Serve has it running once it has started (a cold start: seconds here)
        assert wait_for(lambda: gauge("dynpart_desired_replicas") == 2, 15)
        print(f"2 replicas desired after {time.monotonic() - t0:.1f} s of burst")
        assert gauge("dynpart_predicted_ttft_seconds") is not None
        assert wait_for(lambda: running("slo") == 2, 60), serve.status().applications[APP]
        print(f"2 replicas after {time.monotonic() - t0:.1f} s of burst")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        t1 = time.monotonic()
        assert wait_for(lambda: running("slo") == 1, 60), serve.status().applications[APP]
        print(f"back to 1 replica {time.monotonic() - t1:.1f} s after the burst")
    finally:
        delete_app(APP)
    decisions = slo_decisions(ray_session, "slo")
    print("".join(decisions[-6:]))
    assert any("1 -> 2 replicas: up:" in line for line in decisions), decisions
    # back down, idle (no request in the window) or down (the tail of the burst still in it, one replica enough)
    assert any("2 -> 1 replicas: idle" in line or "2 -> 1 replicas: down:" in line for line in decisions), decisions
