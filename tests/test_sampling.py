"""Sampling and stopping as a user of the API relies on them."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from conftest import local_engine

from app.engine.messages import RequestError
from app.engine.sampling import SamplingParams, sample
from strategies.loader import Checkpoint


@pytest.fixture(scope="module")
def engine(chat_tiny):
    return local_engine(chat_tiny, Checkpoint(chat_tiny).tokenizer(), max_model_len=128)


PROMPT = [1, 504, 2988, 314, 2535, 42]


def run(engine, **params):
    return engine.generate([PROMPT], SamplingParams(**params))[0]


def test_same_seed_same_tokens_and_different_seed_differs(engine):
    a = run(engine, max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    b = run(engine, max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    c = run(engine, max_tokens=16, temperature=1.0, seed=8, ignore_eos=True)
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    greedy = run(engine, max_tokens=12, ignore_eos=True).output_ids
    assert run(engine, max_tokens=12, temperature=1.5, top_k=1, seed=1, ignore_eos=True).output_ids == greedy
    assert run(engine, max_tokens=12, temperature=1.5, top_p=1e-6, seed=2, ignore_eos=True).output_ids == greedy


def test_top_k_restricts_to_the_k_best():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0, 4.8])
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=2.0, top_k=2), g) for _ in range(200)}
    assert picks == {1, 2}


def test_top_p_keeps_the_smallest_sufficient_prefix():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert picks == {0, 1}


def test_max_tokens_is_exact_and_reports_length(engine):
    seq = run(engine, max_tokens=5, ignore_eos=True)
    assert len(seq.output_ids) == 5 and seq.finish_reason == "length"


def test_stop_sequence_ends_generation_and_is_not_returned(engine):
    full = run(engine, max_tokens=24, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[4:7]
    seq = run(engine, max_tokens=24, ignore_eos=True, stop=[stop])
    assert seq.finish_reason == "stop"
    assert seq.text == full.text[: full.text.find(stop)]


def test_eos_stops_unless_ignored(chat_tiny):
    ckpt = Checkpoint(chat_tiny)
    greedy = local_engine(chat_tiny, ckpt.tokenizer(), [], max_num_seqs=1, max_model_len=128).generate(
        [PROMPT], SamplingParams(max_tokens=8))[0].output_ids
    eos = greedy[3]  # pretend the 4th greedy token is EOS
    engine = local_engine(chat_tiny, ckpt.tokenizer(), [eos], max_num_seqs=1, max_model_len=128)
    stopped = engine.generate([PROMPT], SamplingParams(max_tokens=8))[0]
    assert stopped.output_ids == greedy[: greedy.index(eos) + 1] and stopped.finish_reason == "stop"
    assert engine.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))[0].output_ids == greedy


def test_requests_that_cannot_fit_are_refused_with_the_limit(engine):
    with pytest.raises(RequestError, match="exceeds the context limit of 128"):
        engine.add(list(range(1, 100)), SamplingParams(max_tokens=64))
    with pytest.raises(RequestError, match="empty"):
        engine.add([], SamplingParams())
    with pytest.raises(RequestError, match="unknown prefill strategy"):
        engine.add([1, 2], SamplingParams(), strategy="fastest")


def test_bad_parameters_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_k=-2), dict(stop=["a"] * 9)):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)


def test_load_reports_the_wait_a_new_request_would_have(chat_tiny):
    """What admission control reads: idle, nothing to wait for; with max_num_seqs running, the tokens still to
    generate spread over them at the measured step time, plus the planner's time for the prompts waiting for
    prefill."""
    engine = local_engine(chat_tiny, Checkpoint(chat_tiny).tokenizer(), max_num_seqs=2, max_model_len=128,
                          predict_prefill_s=lambda tokens: 0.001 * tokens)
    assert engine.load().wait_s == 0 and engine.load().running == 0
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    seqs = [engine.add(PROMPT, params) for _ in range(5)]
    engine.step()  # prefill of two (max_num_seqs), three wait
    engine.step()  # a decode step: measured
    load = engine.load()
    assert (load.running, load.waiting, load.waiting_prompt_tokens) == (2, 3, 3 * len(PROMPT))
    assert load.step_s > 0 and load.decode_tokens_left == 2 * (10 - 2) + 3 * 10
    assert load.wait_s == pytest.approx(0.001 * 3 * len(PROMPT) + load.step_s * load.decode_tokens_left / 2)
    while not all(s.finished for s in seqs):
        engine.step()
    assert engine.load().wait_s == 0


def _batch_case():
    """Rows of every kind: greedy (0 and a temperature under GREEDY_BELOW), seeded and unseeded, top-k, top-p."""
    from app.engine.sampling import make_generator

    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=1e-7, seed=1),
              SamplingParams(temperature=1.3, top_k=5, seed=4), SamplingParams(),
              SamplingParams(temperature=0.7, top_p=0.5, seed=5), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=1.0, top_k=3, top_p=0.9)]  # unseeded: its seed from torch's global RNG
    return params, lambda: [make_generator(p) for p in params]


def test_sample_batch_equals_sample_row_by_row():
    from app.engine.sampling import sample_batch

    params, generators = _batch_case()
    torch.manual_seed(0)
    gens_a = generators()
    torch.manual_seed(0)
    gens_b = generators()
    g = torch.Generator().manual_seed(11)
    for _ in range(20):  # several steps: the generators must stay in step too
        logits = torch.randn(len(params), 300, generator=g) * 3
        want = [sample(logits[i], p, gens_a[i]) for i, p in enumerate(params)]
        assert sample_batch(logits, params, gens_b) == want


def test_sample_batch_picks_all_greedy_rows_with_one_argmax(monkeypatch):
    from app.engine import sampling

    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(), SamplingParams()]
    gens = [sampling.make_generator(p) for p in params]
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],  # a tie: the first maximum, as torch.argmax on one row
                           [0.0, 0.0, 9.0, 0.0],
                           [float("-inf"), -1.0, -1.0, -2.0],
                           [2.0, 2.0, 2.0, 2.0]])
    calls = []
    argmax = torch.argmax
    monkeypatch.setattr(torch, "argmax", lambda *a, **k: calls.append(a[0].shape) or argmax(*a, **k))
    assert sampling.sample_batch(logits, params, gens) == [1, 2, 1, 0]
    assert calls == [torch.Size([3, 4])]


def test_sample_batch_edges():
    from app.engine.sampling import sample_batch

    assert sample_batch(torch.empty(0, 5), [], []) == []
    half = torch.randn(3, 50).to(torch.bfloat16)
    greedy = [SamplingParams()] * 3
    assert sample_batch(half, greedy, [None] * 3) == [sample(row, greedy[0], None) for row in half]
    with pytest.raises(ValueError):
        sample_batch(torch.zeros(2, 5), greedy, [None] * 3)
    with pytest.raises(ValueError):
        sample_batch(torch.zeros(5), greedy[:1], [None])
