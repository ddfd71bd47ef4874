"""``dynpart demo``: send a mix of short and long prompts to the Serve app and show where each one went.

Uses a running app at ``--url`` if one answers, otherwise starts ``dynpart serve <config>`` (its own Ray) for the demo
and stops it afterwards. Per request it prints the prompt length, the pool and prefill strategy the ingress and the
engine chose, the prefill time, the time to first token and the decode rate seen by the client.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from app.cli.format import number

PARAGRAPH = ("Ray Serve runs each engine replica as a placement group of devices; the ingress reads the prompt, asks "
             "the cost model how long each pool would take to prefill it, and sends it to the fastest one. ")
PROMPTS = [("short", "The capital of France is"),
           ("short", "Write a haiku about GPUs."),
           ("long", PARAGRAPH * 24 + "Summarise the text above in one sentence:"),
           ("short", "What is 2 + 2?"),
           ("long", PARAGRAPH * 40 + "What does the ingress do?")]


def register(sub) -> None:
    p = sub.add_parser("demo", help="send short and long prompts to the Serve app; show pool, strategy, TTFT")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running app (else one is started)")
    p.add_argument("--config", default="serve_config.yaml", help="config to start when nothing answers at --url")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true", help="one JSON object per request")
    p.set_defaults(func=demo)


def healthy(url: str, client=None) -> bool:
    """``url``'s ``/health`` is 200. A caller that polls passes one ``httpx.Client``: each new client builds an SSL
    context (~25 ms of CPU here, taken from the app it waits for)."""
    import httpx

    try:
        return (client or httpx).get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def serve_run(config: str | Path, url: str, log_path: str | Path, timeout_s: float = 300):
    """``dynpart serve config`` (``serve run`` that drains on Ctrl-C) in its own process group and its own Ray, until
    ``url`` is healthy; Ctrl-C on exit (waits up to 90 s for the drain and the shutdown)."""
    from placement.workers import local_ray_options

    local_ray_options()  # sets the environment a local Ray needs here (token auth off)
    # This checkout's code, not whatever the venv's `dynpart` script was installed from (a worktree sharing a venv):
    # the module by path, and PYTHONPATH for the Ray workers, which import the app by name.
    root = str(Path(__file__).resolve().parents[2])
    env = {"HF_HUB_OFFLINE": "1", **os.environ, "RAY_ADDRESS": "local",  # never attach to another cluster
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    import httpx

    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli.main", "serve", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            with httpx.Client() as client:
                while not healthy(url, client):
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"dynpart serve {config} did not come up; see {log_path}")
                    time.sleep(2)
            yield proc
        finally:
            if proc.poll() is None:  # still running (the caller may have stopped it already)
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; time the first token and the rest on the client."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = end = None
    usage = {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {r.read().decode()[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
        end = time.perf_counter()
    d, n = usage.get("dynpart", {}), usage.get("completion_tokens", 0)
    return {"prompt_tokens": usage.get("prompt_tokens"), "pool": d.get("pool"), "strategy": d.get("strategy"),
            "prefill_ms": d.get("prefill_ms"), "ttft_ms": round((first - t0) * 1e3, 1),
            "tokens_per_s": round((n - 1) / (end - first), 1) if n > 1 and end > first else None}


def demo(args: argparse.Namespace) -> int:
    import tempfile

    url = args.url.rstrip("/")
    if healthy(url):
        return _run(url, args)
    log = Path(tempfile.gettempdir()) / f"dynpart-demo-{os.getpid()}.log"
    print(f"starting dynpart serve {args.config} (log: {log}) ...", file=sys.stderr)
    with serve_run(args.config, url, log):
        return _run(url, args)


def _run(url: str, args: argparse.Namespace) -> int:
    import httpx

    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    if not args.json:
        print(f"{'kind':<6} {'prompt':>6} {'pool':<10} {'strategy':<22} {'prefill ms':>10} {'TTFT ms':>9} "
              f"{'tok/s':>7}")
    for kind, prompt in PROMPTS:
        row = {"kind": kind, **one_request(url, model, prompt, args.max_tokens)}
        if args.json:
            print(json.dumps(row))
        elif "error" in row:
            print(f"{kind:<6} error {row['error']}")
        else:
            print(f"{kind:<6} {row['prompt_tokens']:>6} {row['pool']:<10} {row['strategy']:<22} "
                  f"{row['prefill_ms']:>10.1f} {row['ttft_ms']:>9.1f} {number(row['tokens_per_s']):>7}")
    return 0
