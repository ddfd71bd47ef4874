"""An engine deployment autoscales on Serve's ``autoscaling_config``: up under load, back down when idle."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

APP = "serve-scale"


def running(deployment: str) -> int:
    from ray import serve

    return serve.status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0)


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
    serve.run(build_app({"model": chat_tiny, "pools": [pool], "graceful_shutdown_s": 1, "shared_weights": False}),
              name=APP, route_prefix="/scale")
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
        serve.delete(APP)


@pytest.mark.slow
def test_a_pool_scaled_to_zero_is_idle_not_lost_and_its_first_request_starts_a_replica(serve_session, chat_tiny):
    """A pool at zero replicas by its autoscaler: ``/health`` is ``ok`` and says it is idle (not lost, not
    starting); a request sent there is answered 200 once a replica has started for it (the cold start measured and
    reported); back at zero after idling, the next request is answered 200 as well."""
    from ray import serve

    from app.serve.app import build_app

    pool = dict(name="zero", devices=1, max_num_seqs=2, max_model_len=512,
                autoscaling=dict(min_replicas=0, initial_replicas=0, max_replicas=1, target_ongoing_requests=1,
                                 upscale_delay_s=0, downscale_delay_s=2, look_back_period_s=1, metrics_interval_s=0.5))
    serve.run(build_app({"model": chat_tiny, "pools": [pool], "graceful_shutdown_s": 1, "shared_weights": False,
                         "request_timeout_s": 120}), name=APP, route_prefix="/zero")
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
                # idle again, and the board measured the start from zero
                assert wait_for(lambda: running("zero") == 0 and health()["pools"]["zero"]["idle"], 60), health()
                state = health()
                assert state["status"] == "ok" and not state["pools"]["zero"]["lost"], state
                assert state["pools"]["zero"]["cold_start_s"] > 0, state
                print("health while idle:", state["pools"]["zero"])
    finally:
        serve.delete(APP)
