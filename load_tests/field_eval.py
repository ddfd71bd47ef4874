"""lm-evaluation-harness against dynpart, with transformers as the reference (``load_tests.field_tools`` runs it).

Two tasks built from local data (``load_tests/field_tasks``: no download, every sample known) cover both ways
lm-eval reads a model: ``dynpart_capitals`` is multiple choice (each choice's log-likelihood: through the server,
``/v1/completions`` with token-id prompts, ``echo`` and ``logprobs: 1``), ``dynpart_arithmetic`` is
``generate_until`` (greedy to the first newline). The same ``lm_eval`` runs each task twice with ``--log_samples``:
``--model hf`` (transformers on the model folder, float32) and ``--model local-completions`` (dynpart). They agree
when every sample's log-likelihoods are within a tolerance (both float32: 1e-3 leaves room for the order of
reductions, and no more), every generation is the same text, and every score is the same.

The task YAMLs name their data ``DATA_DIR/<file>.jsonl``: ``eval_tasks`` copies them into an include folder with
the absolute path of ``field_tasks`` put in, so lm-eval finds the data from any working directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

LM_EVAL = "lm_eval[hf,api]==0.4.13"
TASKS = Path(__file__).resolve().parent / "field_tasks"
TASK_NAMES = ("dynpart_capitals", "dynpart_arithmetic")
METRICS = {"dynpart_capitals": "acc", "dynpart_arithmetic": "exact_match"}
FAILED_REQUEST = "API request failed"  # lm-eval's warning for each non-2xx answer (it then retries)


def eval_tasks(dest: Path, source: Path = TASKS) -> Path:
    """``source``'s task YAMLs in ``dest`` with ``DATA_DIR`` replaced by ``source``'s absolute path."""
    dest.mkdir(parents=True, exist_ok=True)
    for yml in sorted(source.glob("*.yaml")):
        (dest / yml.name).write_text(yml.read_text().replace("DATA_DIR", str(source.resolve())))
    return dest


def lm_eval_cmd(venv: Path, model: str, model_args: str, tasks: Path, out: Path) -> list[str]:
    """``lm_eval`` on both tasks from the include folder ``tasks``, samples logged, results under ``out``."""
    return [str(venv / "bin" / "lm_eval"), "--model", model, "--model_args", model_args,
            "--tasks", ",".join(TASK_NAMES), "--include_path", str(tasks), "--batch_size", "1",
            "--output_path", str(out), "--log_samples"]


def newest(folder: Path, pattern: str) -> Path:
    """The newest file under ``folder`` matching ``pattern`` (lm-eval nests them under the model's name)."""
    hits = sorted(folder.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not hits:
        raise FileNotFoundError(f"no {pattern} under {folder}")
    return hits[-1]


def load_samples(path: Path) -> dict[int, dict]:
    """One ``--log_samples`` file by ``doc_id``."""
    return {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines()) if s}


def logliks(sample: dict) -> list[float] | None:
    """A loglikelihood sample's per-choice log-likelihoods (``filtered_resps``: ``[logprob, is_greedy]`` each);
    None for a generation."""
    resps = sample.get("filtered_resps") or []
    if resps and isinstance(resps[0], (list, tuple)):
        return [float(r[0]) for r in resps]
    return None


def generation(sample: dict) -> str | None:
    resps = sample.get("filtered_resps") or []
    return resps[0] if resps and isinstance(resps[0], str) else None


def compare_samples(ref: dict[int, dict], got: dict[int, dict], tolerance: float) -> dict:
    """How one task's samples from the server (``got``) compare with the reference's: the largest log-likelihood
    difference, the docs whose generations differ, the docs missing on either side, and whether they agree."""
    missing = sorted(set(ref) ^ set(got))
    worst, differing = None, []
    for doc in sorted(set(ref) & set(got)):
        a, b = logliks(ref[doc]), logliks(got[doc])
        if a is not None or b is not None:
            if a is None or b is None or len(a) != len(b):
                differing.append(doc)
                continue
            d = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
            worst = d if worst is None else max(worst, d)
        elif generation(ref[doc]) != generation(got[doc]):
            differing.append(doc)
    return {"samples": len(got), "missing": missing, "max_loglik_diff": worst, "generations_differing": differing,
            "agree": not missing and not differing and (worst is None or worst <= tolerance)}


def scores(results: dict) -> dict[str, float]:
    """``task`` → its metric (``METRICS``) from an lm-eval results JSON (keys like ``acc,none``)."""
    out = {}
    for task, metric in METRICS.items():
        row = (results.get("results") or {}).get(task) or {}
        key = next((k for k in row if k.split(",")[0] == metric), None)
        if key is not None:
            out[task] = row[key]
    return out


def failed_requests(log_text: str) -> int:
    """Requests lm-eval saw fail (each logged once before its retry)."""
    return len(re.findall(re.escape(FAILED_REQUEST), log_text))


def compare_runs(hf: Path, served: Path, tolerance: float, served_log: Path) -> dict:
    """The reference run (``hf``) against the server's (``served``): per task the scores and the sample comparison;
    ``agree`` when every task's samples agree and its scores are equal."""
    ref_scores = scores(json.loads(newest(hf, "results_*.json").read_text()))
    got_scores = scores(json.loads(newest(served, "results_*.json").read_text()))
    tasks = {}
    for task in TASK_NAMES:
        c = compare_samples(load_samples(newest(hf, f"samples_{task}_*.jsonl")),
                            load_samples(newest(served, f"samples_{task}_*.jsonl")), tolerance)
        tasks[task] = {"metric": METRICS[task], "hf_score": ref_scores.get(task), "served_score": got_scores.get(task),
                       **c, "agree": c["agree"] and task in ref_scores and ref_scores[task] == got_scores.get(task)}
    failed = failed_requests(served_log.read_text(errors="replace")) if served_log.is_file() else 0
    return {"tolerance": tolerance, "tasks": tasks, "failed": failed, "agree": all(t["agree"] for t in tasks.values())}
