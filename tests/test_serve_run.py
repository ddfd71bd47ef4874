"""``serve run serve_config.yaml`` — the README's main job — starts its own Ray, answers, and stops on Ctrl-C;
``dynpart demo`` against it prints where each prompt went.

The shipped config is used as is except for its ports (8000/9000 may be taken on a shared machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from app.cli.demo import serve_run
from placement.workers import free_port
from strategies.cost import get_hardware, plan_prefill
from strategies.loader import Checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_run_of_the_shipped_config_answers(tmp_path, smollm2):
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    http = free_port()
    cfg["http_options"]["port"], cfg["grpc_options"]["port"] = http, free_port()
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{http}"
    with serve_run(path, url, tmp_path / "serve.log", timeout_s=240):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["text"]
        assert r.headers["x-dynpart-pool"] == "short" and r.headers["x-dynpart-strategy"] == "megatron"
        demo = [sys.executable, "-m", "app.cli.main", "demo", "--url", url, "--json", "--max-tokens", "4"]
        out = subprocess.run(demo, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {r["pool"] for r in rows if r["kind"] == "short"} == {"short"}
    # long prompts do not fit `short`'s context: `long`, prefilled as the planner prices this machine's CPU, in
    # chunks of the pool's token budget (the demo sends one prompt at a time: the first chunk is the largest)
    shape = Checkpoint(smollm2).shape
    budget = next(p for p in cfg["applications"][0]["args"]["pools"] if p["name"] == "long")["max_num_batched_tokens"]
    for r in rows:
        if r["kind"] == "long":
            first = min(r["prompt_tokens"], budget)
            assert r["pool"] == "long" and r["strategy"] == plan_prefill(shape, get_hardware("cpu"), 2,
                                                                         first).strategy, r
