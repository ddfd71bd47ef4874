"""``serve run serve_config.yaml`` — the README's main job — starts its own Ray, answers, and stops on Ctrl-C.

The shipped config is used as is except for its ports (8000/9000 may be taken on a shared machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from placement.workers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_run_of_the_shipped_config_answers(tmp_path, smollm2):
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    http, grpc_port = free_port(), free_port()
    cfg["http_options"]["port"], cfg["grpc_options"]["port"] = http, grpc_port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    serve = Path(sys.executable).with_name("serve")
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of its own, never another test's cluster
    proc = subprocess.Popen([str(serve), "run", str(path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group: Ctrl-C reaches the whole command
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=60) as c:
            deadline = time.time() + 240
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.time() < deadline, "serve run did not become ready"
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(2)
            r = c.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "The capital of France is",
                                                "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            assert "Paris" in r.json()["choices"][0]["text"]
            assert r.headers["x-dynpart-pool"] == "l4x1" and r.headers["x-dynpart-strategy"] == "megatron"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
