"""``dynpart serve serve_config.yaml`` (``serve run`` that drains on Ctrl-C) — the README's main job — starts its own
Ray, answers, and on Ctrl-C finishes the streams in flight while refusing new requests; ``dynpart demo`` against it
prints where each prompt went.

The shipped config is used as is except for its ports (8000/9000 may be taken on a shared machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from app.cli.demo import serve_run
from placement.workers import free_port
from cost import get_hardware, plan_prefill
from cost.layouts import resident_bytes
from cost.planner import contenders, executable_layouts
from strategies.layout import check_devices, parse_layout
from strategies.loader import Checkpoint

ROOT = Path(__file__).resolve().parents[1]


def fitting(shape, layouts: list[str], budget_gb: float, p: int = 2) -> list[str]:
    """The layouts a pool's workers build, in order, while their extras fit the replica budget together (the cost
    model's memory equals what workers hold within 3%: tests/test_layouts.py)."""
    padded = check_devices(shape, p).padded_shape(shape)
    held = lambda names: resident_bytes([parse_layout(n) for n in names], padded, p, 4)  # noqa: E731
    base, kept = held(["megatron"]), []
    for name in layouts:
        if held([*kept, name, "megatron"]) - base <= budget_gb * 1e9:
            kept.append(name)
    return kept


def stream_in_background(url: str, lines: list[str], max_tokens: int) -> tuple[threading.Event, threading.Thread]:
    """Start a streamed completion in a thread collecting its ``data:`` lines (or the transport error); the event is
    set once the first line arrived (or the stream failed)."""
    first = threading.Event()

    def stream() -> None:
        body = {"model": "smollm2-135m", "prompt": "Count to twenty:", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        first.set()
        except httpx.HTTPError as e:
            lines.append(f"transport error: {e!r}")
        first.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    return first, thread


def assert_short_has_a_core_of_its_own(serve_pid: int) -> None:
    """The shipped config's ``short`` device (a whole core) computes on one core, and the processes of the Ray that
    ``dynpart serve`` started (the proxy, the controller, the ingress, ``long``'s ranks) run elsewhere
    (placement/cores.py)."""
    import psutil

    procs = psutil.Process(serve_pid).children(recursive=True)
    short = [p for p in procs if "ServeReplica:dynpart:short" in " ".join(p.cmdline())]
    assert len(short) == 1, [p.cmdline() for p in procs]
    core = set(short[0].cpu_affinity())
    assert len(core) == 1, f"short's replica runs on cores {sorted(core)}"
    shared = {p.name(): p.cpu_affinity() for p in procs if p not in short}
    assert all(core.isdisjoint(cores) for cores in shared.values()), (core, shared)


@pytest.mark.slow
@pytest.mark.own_ray
def test_serve_run_of_the_shipped_config_answers(tmp_path, smollm2):
    """The README's main job says when it is ready, answers, routes, and on Ctrl-C lets a stream in flight finish."""
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    http = free_port()
    cfg["http_options"]["port"], cfg["grpc_options"]["port"] = http, free_port()
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{http}"
    with serve_run(path, url, tmp_path / "serve.log", timeout_s=240) as proc:
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["text"]
        assert r.headers["x-dynpart-pool"] == "short" and r.headers["x-dynpart-strategy"] == "megatron"
        # ready means ready: /health was 200 only once every pool had a warmed replica, and the command says so
        assert "dynpart serve: ready: app 'dynpart'" in (tmp_path / "serve.log").read_text()
        if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
            assert_short_has_a_core_of_its_own(proc.pid)
        demo = [sys.executable, "-m", "app.cli.main", "demo", "--url", url, "--json", "--max-tokens", "4"]
        out = subprocess.run(demo, capture_output=True, text=True, timeout=300, cwd=ROOT)
        streamed: list[str] = []
        first, streaming = stream_in_background(url, streamed, max_tokens=96)  # seconds of decode here
        assert first.wait(60)
        ctrl_c = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        # dynpart serve tells the board, the ingress reads it on its next beat: wait until /health says so (a fixed
        # second was not always enough with the suite's other load on the 2 cores)
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=10) as client:  # one client for the polls (each new one builds an SSL context)
            while client.get(f"{url}/health").json().get("status") != "draining":
                assert time.monotonic() < deadline, "the ingress never reported draining after Ctrl-C"
                time.sleep(0.1)
        refused = httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4})
        still_streaming = streaming.is_alive()
        streaming.join(60)
        stopped = proc.wait(90)
    # the stream admitted before Ctrl-C finished; a request during the drain was refused with a 503 naming the shutdown
    assert streamed[-1] == "data: [DONE]" and '"finish_reason": "length"' in streamed[-2], streamed[-3:]
    assert still_streaming, "the stream ended before the request sent during the drain: make it longer"
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"], refused.text
    assert stopped == 0
    print(f"Ctrl-C with a stream in flight: it finished ({len(streamed)} events); dynpart serve stopped "
          f"{time.monotonic() - ctrl_c:.1f} s after Ctrl-C")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {r["pool"] for r in rows if r["kind"] == "short"} == {"short"}
    # long prompts do not fit `short`'s context: `long`, prefilled by a layout its planner offers (the named strategies
    # and the front, priced as this machine's CPU shared by the pool's ranks), in chunks of the pool's token budget
    shape = Checkpoint(smollm2).shape
    long = next(p for p in cfg["applications"][0]["args"]["pools"] if p["name"] == "long")
    budget = long["max_num_batched_tokens"]
    hw = get_hardware("cpu").time_shared(long["cpus_per_device"])  # as the pool's engine prices its ranks
    offered = contenders(shape, hw, 2, fitting(shape, executable_layouts(shape, hw, 2), long["replica_budget_gb"]),
                         budget)  # what the engine picks from
    longs = [r for r in rows if r["kind"] == "long"]
    assert longs and all(r["pool"] == "long" and r["strategy"] in offered for r in longs), (longs, offered)
    # the first long prompt has nothing cached (later ones share its prefix): its first chunk is its largest
    first = min(longs[0]["prompt_tokens"], budget)
    assert longs[0]["strategy"] == plan_prefill(shape, hw, 2, first, available=offered).strategy, (longs[0], offered)
