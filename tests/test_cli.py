"""The dynpart command line: run as a user runs it (a real subprocess) where it computes; its argument errors through
the same ``main`` in this process (a subprocess costs seconds of imports per case here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def dynpart(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli.main", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def in_process(*args: str) -> int:
    """``dynpart *args`` through the console script's ``main``: its exit status (argparse's errors exit 2)."""
    from app.cli.main import main

    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def test_generate_json_on_the_default_model(smollm2):
    out = dynpart("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in result["text"]
    assert len(result["token_ids"]) == 8 and result["prompt_tokens"] == 5
    assert result["ttft_ms"] > 0 and result["tpot_ms"] > 0
    assert result["devices"] == 1 and result["prefill_strategy"] == "megatron"


@pytest.mark.slow
@pytest.mark.own_ray
def test_generate_on_two_devices_gives_transformers_tokens(chat_tiny):
    from conftest import reference_greedy

    from strategies.loader import Checkpoint

    args = ["generate", "--model", chat_tiny, "--prompt", "Once upon a time", "--max-tokens", "12", "--json",
            "--dtype", "float32"]
    two = dynpart(*args, "--devices", "2", "--prefill-strategy", "weight_gathered")
    assert two.returncode == 0, two.stderr
    two = json.loads(two.stdout.strip().splitlines()[-1])
    prompt = Checkpoint(chat_tiny).tokenizer()("Once upon a time")["input_ids"]
    ref = reference_greedy(chat_tiny, prompt, 12)  # transformers' greedy tokens, EOS ignored
    n, eos = len(two["token_ids"]), Checkpoint(chat_tiny).eos_token_ids()
    assert two["token_ids"] == ref[:n] and (n == 12 or ref[n - 1] in eos or ref[n] in eos)  # all, or up to EOS
    assert (two["devices"], two["prefill_strategy"]) == (2, "weight_gathered")


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "unknown model"),
    (["--devices", "64"], "more than this machine offers"),
    (["--temperature", "-1"], "temperature"),
    (["--max-tokens", "0"], "max_tokens"),
])
def test_bad_arguments_get_one_clear_error(args, message, capsys):
    assert in_process("generate", "--prompt", "hi", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_strategy_is_refused_by_the_parser(capsys):
    assert in_process("generate", "--prompt", "hi", "--prefill-strategy", "ring") == 2
    assert "unknown prefill strategy 'ring'" in capsys.readouterr().err
    assert in_process("generate", "--prompt", "hi", "--prefill-strategy",
                      "residual=TOK qkv=col attn=heads o=row gate_up=col down=sideways") == 2
    assert "layout field 'down': 'sideways'" in capsys.readouterr().err


def test_serve_names_a_missing_config_and_drains_the_shipped_apps(capsys):
    """``dynpart serve`` (make serve) refuses a missing config in one line; on Ctrl-C it drains every dynpart app of
    the config for its graceful_shutdown_s (the drain itself: tests/test_serve_run.py)."""
    from pathlib import Path

    from app.cli.serve import apps_to_drain

    assert in_process("serve", "/no/such/serve_config.yaml") == 2
    assert "no Serve config at /no/such/serve_config.yaml" in capsys.readouterr().err
    shipped = Path(__file__).resolve().parents[1] / "serve_config.yaml"
    assert apps_to_drain(shipped) == {"dynpart": 30.0}
