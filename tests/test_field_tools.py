"""The pure parts of ``load_tests.field_tools`` and ``field_eval`` (the field's tools against dynpart): guidellm's
command line and JSON report, the lm-eval task copies, and how two lm-eval runs' samples and scores compare. No
venvs, no server."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from load_tests import field_eval, field_tools

# --log_samples lines as lm-eval 0.4.13 wrote them for the hf model (log-likelihoods are strings there).
CAPITAL = {"doc_id": 0, "doc": {"question": "The capital of France is", "choices": ["Paris", "Berlin"], "answer": 0},
           "target": "0", "resps": [[["-0.2580621838569641", "True"]], [["-6.920718193054199", "False"]]],
           "filtered_resps": [["-0.2580621838569641", "True"], ["-6.920718193054199", "False"]], "acc": 1.0}
SUM = {"doc_id": 0, "doc": {"question": "What is 7 plus 7?", "answer": "14"}, "target": "14",
       "resps": [[" 10"]], "filtered_resps": [" 10"], "exact_match": 0.0}
RESULTS = {"results": {"dynpart_capitals": {"acc,none": 1.0, "acc_stderr,none": 0.0},
                       "dynpart_arithmetic": {"exact_match,none": 0.25, "exact_match_stderr,none": 0.0993}}}


def test_log_likelihoods_within_the_tolerance_agree_and_beyond_it_do_not():
    near = copy.deepcopy(CAPITAL)
    near["filtered_resps"][1][0] = str(-6.920718193054199 + 4e-4)
    c = field_eval.compare_samples({0: CAPITAL}, {0: near}, 1e-3)
    assert c["agree"] and c["max_loglik_diff"] == pytest.approx(4e-4) and c["samples"] == 1
    assert not field_eval.compare_samples({0: CAPITAL}, {0: near}, 1e-4)["agree"]
    fewer = {**CAPITAL, "filtered_resps": CAPITAL["filtered_resps"][:1]}
    assert field_eval.compare_samples({0: CAPITAL}, {0: fewer}, 1e-3)["generations_differing"] == [0]


def test_generations_must_be_the_same_text_and_every_doc_on_both_sides():
    assert field_eval.compare_samples({0: SUM}, {0: copy.deepcopy(SUM)}, 1e-3)["agree"]
    other = {**SUM, "filtered_resps": [" 14"]}
    c = field_eval.compare_samples({0: SUM}, {0: other}, 1e-3)
    assert not c["agree"] and c["generations_differing"] == [0] and c["max_loglik_diff"] is None
    c = field_eval.compare_samples({0: SUM, 1: {**SUM, "doc_id": 1}}, {0: SUM}, 1e-3)
    assert not c["agree"] and c["missing"] == [1]


def test_two_runs_agree_only_with_equal_scores_and_no_failed_request(tmp_path):
    def write(folder: Path, results: dict, capital: dict) -> Path:
        d = folder / "model"
        d.mkdir(parents=True)
        (d / "results_2026-12-05T22-30-37.json").write_text(json.dumps(results))
        (d / "samples_dynpart_capitals_2026-12-05T22-30-37.jsonl").write_text(json.dumps(capital) + "\n")
        (d / "samples_dynpart_arithmetic_2026-12-05T22-30-37.jsonl").write_text(json.dumps(SUM) + "\n")
        return folder

    hf = write(tmp_path / "hf", RESULTS, CAPITAL)
    log = tmp_path / "served.log"
    log.write_text("INFO ok\n")
    same = field_eval.compare_runs(hf, write(tmp_path / "a", RESULTS, CAPITAL), 1e-3, log)
    assert same["agree"] and same["failed"] == 0
    arithmetic = same["tasks"]["dynpart_arithmetic"]
    assert arithmetic["hf_score"] == arithmetic["served_score"] == 0.25
    lower = copy.deepcopy(RESULTS)
    lower["results"]["dynpart_capitals"]["acc,none"] = 0.95
    c = field_eval.compare_runs(hf, write(tmp_path / "b", lower, CAPITAL), 1e-3, log)
    assert not c["agree"] and not c["tasks"]["dynpart_capitals"]["agree"] and c["tasks"]["dynpart_arithmetic"]["agree"]
    log.write_text("WARNING API request failed with error message: {...}. Retrying...\n")
    assert field_eval.compare_runs(hf, write(tmp_path / "c", RESULTS, CAPITAL), 1e-3, log)["failed"] == 1


def test_task_copies_point_at_the_local_data(tmp_path):
    tasks = field_eval.eval_tasks(tmp_path / "tasks")
    for name in field_eval.TASK_NAMES:
        spec = yaml.safe_load((tasks / f"{name}.yaml").read_text())
        assert spec["task"] == name
        data = Path(spec["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.is_file() and len(data.read_text().splitlines()) == 20
    cmd = field_eval.lm_eval_cmd(Path("/v"), "hf", "pretrained=/m,dtype=float32", tasks, tmp_path / "out")
    assert cmd[0] == "/v/bin/lm_eval" and "--log_samples" in cmd and cmd[cmd.index("--include_path") + 1] == str(tasks)


# A ``guidellm run --output kind=json`` report as guidellm 0.8.1 wrote it, cut to what is read (one benchmark).
def guidellm_report(ok: int = 16, errored: int = 0, incomplete: int = 0) -> dict:
    stat = lambda median, mean=None: {"successful": {"median": median, "mean": mean or median}}  # noqa: E731
    return {"benchmarks": [{
        "duration": 12.5,
        "metrics": {"request_totals": {"successful": ok, "errored": errored, "incomplete": incomplete,
                                       "total": ok + errored + incomplete},
                    "prompt_token_count": stat(64.0), "output_token_count": stat(32.0),
                    "time_to_first_token_ms": stat(210.0), "inter_token_latency_ms": stat(95.0),
                    "request_latency": stat(3.2), "output_tokens_per_second": stat(30.0, 41.0)},
        "requests": {"successful": [], "errored": [{"info": {"error": "HTTP 400: bad field"}}] * errored,
                     "incomplete": []}}]}


def test_guidellm_report_counts_errored_and_incomplete_as_failed():
    r = field_tools.parse_guidellm(guidellm_report())
    assert (r["completed"], r["failed"], r["num_prompts"]) == (16, 0, 16)
    assert r["ttft_p50_ms"] == 210.0 and r["e2el_p50_ms"] == pytest.approx(3200.0) and r["tok_s"] == 41.0
    bad = field_tools.parse_guidellm(guidellm_report(ok=13, errored=2, incomplete=1))
    assert bad["failed"] == 3 and bad["errors"] == ["HTTP 400: bad field"]
    with pytest.raises(ValueError, match="one benchmark"):
        field_tools.parse_guidellm({"benchmarks": []})


def test_guidellm_command_uses_the_0_8_options():
    cmd = field_tools.guidellm_cmd(Path("/g"), "http://127.0.0.1:8000", "smollm2-135m", Path("/m"), prompt_tokens=64,
                                   output_tokens=32, requests=16, concurrency=4, out=Path("/o/guidellm.json"))
    opts = dict(zip(cmd[2::2], cmd[3::2]))
    assert cmd[:2] == ["/g/bin/guidellm", "run"]
    assert opts["--backend"] == ("kind=openai_http,target=http://127.0.0.1:8000,model=smollm2-135m,"
                                 "request_format=/v1/completions")
    assert opts["--data"] == "kind=synthetic_text,prompt_tokens=64,output_tokens=32"
    assert opts["--constraint"] == "kind=max_requests,count=16" and opts["--profile"] == "kind=concurrent,streams=4"


def test_verdict_needs_every_tool_that_ran_clean():
    clean = {"completed": 16, "failed": 0}
    ev = {"agree": True, "failed": 0}
    assert field_tools.verdict({"vllm_bench_serve": clean, "guidellm": clean, "lm_eval": ev})
    assert not field_tools.verdict({"vllm_bench_serve": clean, "guidellm": {"completed": 15, "failed": 1}})
    assert not field_tools.verdict({"guidellm": clean, "lm_eval": {**ev, "agree": False}})
    assert not field_tools.verdict({})


def test_venv_setup_is_a_no_op_once_stamped(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(field_tools, "run", lambda cmd, what, *a, **k: calls.append(cmd))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    field_tools.setup_venv(tmp_path, field_tools.GUIDELLM)
    assert [c[-1] for c in calls] == ["pip", field_tools.TORCH, field_tools.GUIDELLM]
    calls.clear()
    field_tools.setup_venv(tmp_path, field_tools.GUIDELLM)
    assert calls == []
    field_tools.setup_venv(tmp_path, field_eval.LM_EVAL)  # another tool: installs
    assert calls and calls[-1][-1] == field_eval.LM_EVAL
