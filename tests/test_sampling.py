"""Sampling and stopping as a user of the API relies on them."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

from conftest import local_engine

from app.engine.messages import RequestError
from app.engine.params import SamplingParams
from app.engine.sampling import sample
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


def test_eos_stops_unless_ignored_or_before_min_tokens(chat_tiny):
    ckpt = Checkpoint(chat_tiny)
    greedy = local_engine(chat_tiny, ckpt.tokenizer(), [], max_num_seqs=1, max_model_len=128).generate(
        [PROMPT], SamplingParams(max_tokens=8))[0].output_ids
    eos = greedy[3]  # pretend the 4th greedy token is EOS
    engine = local_engine(chat_tiny, ckpt.tokenizer(), [eos], max_num_seqs=1, max_model_len=128)
    stopped = engine.generate([PROMPT], SamplingParams(max_tokens=8))[0]
    assert stopped.output_ids == greedy[: greedy.index(eos) + 1] and stopped.finish_reason == "stop"
    assert engine.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))[0].output_ids == greedy
    held = engine.generate([PROMPT], SamplingParams(max_tokens=8, min_tokens=5))[0]  # EOS masked for 5 tokens
    assert len(held.output_ids) >= 5 and eos not in held.output_ids[:5]
    held = engine.generate([PROMPT], SamplingParams(max_tokens=8, stop_token_ids=[greedy[0]], min_tokens=2))[0]
    assert greedy[0] not in held.output_ids[:2]


def test_requests_that_cannot_fit_are_refused_with_the_limit(engine):
    with pytest.raises(RequestError, match="exceeds the context limit of 128"):
        engine.add(list(range(1, 100)), SamplingParams(max_tokens=64))
    with pytest.raises(RequestError, match="empty"):
        engine.add([], SamplingParams())
    with pytest.raises(RequestError, match="unknown prefill strategy"):
        engine.add([1, 2], SamplingParams(), strategy="fastest")


def test_bad_parameters_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=-1), dict(top_k=-2), dict(stop=["a"] * 9),
                dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0), dict(min_p=1.5),
                dict(min_tokens=-1), dict(logit_bias={1: 101}), dict(logit_bias={-1: 1}), dict(stop_token_ids=[-2])):
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


def test_a_replica_idle_again_reports_no_load(chat_tiny):
    """The load a replica reports (``EngineLoop.load``) is what its last step left: once a one-token request is
    answered, nothing waits or runs. (It was taken before each step, so an idle replica reported its last prompt as
    still waiting until the next request: the router priced the pool that had just served a prefix as busy and sent
    the follow-up, with the prefix cached there, elsewhere.)"""
    from app.engine.loop import EngineLoop

    loop = EngineLoop(local_engine(chat_tiny, Checkpoint(chat_tiny).tokenizer(), max_model_len=128,
                                   predict_prefill_s=lambda tokens: 0.001 * tokens))
    try:
        done = asyncio.run(loop.run_whole(lambda e: e.add(PROMPT, SamplingParams(max_tokens=1))))
        assert len(done.token_ids) == 1
        load = loop.load
        assert (load.running, load.waiting, load.waiting_prompt_tokens, load.wait_s) == (0, 0, 0, 0.0)
    finally:
        loop.stop()


def _batch_case():
    """Rows of every kind: greedy (0 and a temperature under GREEDY_BELOW), seeded and unseeded, top-k, top-p."""
    from app.engine.sampling import make_generator

    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=1e-7, seed=1),
              SamplingParams(temperature=1.3, top_k=5, seed=4), SamplingParams(),
              SamplingParams(temperature=0.7, top_p=0.5, seed=5), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=1.0, top_k=3, top_p=0.9),  # unseeded: its seed from torch's global RNG
              SamplingParams(frequency_penalty=1.5, presence_penalty=-0.5), SamplingParams(repetition_penalty=1.4),
              SamplingParams(temperature=0.9, seed=6, min_p=0.2, logit_bias={7: 4.0, 9: -50}),
              SamplingParams(temperature=1.1, seed=7, top_k=-1, repetition_penalty=0.8, frequency_penalty=0.7),
              SamplingParams(temperature=0.6, seed=8, min_tokens=3, stop_token_ids=[1, 2], top_p=0.8)]
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
        outputs = [torch.randint(0, 300, (int(torch.randint(0, 6, (), generator=g)),), generator=g).tolist()
                   for _ in params]
        prompts = [torch.randint(0, 300, (4,), generator=g).tolist() for _ in params]
        want = [sample(logits[i], p, gens_a[i], outputs[i], prompts[i], {1}) for i, p in enumerate(params)]
        assert sample_batch(logits, params, gens_b, outputs, prompts, {1}) == want


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


# -- the sampling controls (issue 22, item 2) --------------------------------------------------------------------------

def test_frequency_and_presence_penalties_are_openais_rule_on_the_logits():
    from app.engine.sampling import process_logits

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 50, generator=g) * 4
    outputs, prompts = [[3, 3, 3, 7, 9, 9], [1, 2]], [[3, 4, 5], [6]]
    params = [SamplingParams(frequency_penalty=0.6, presence_penalty=1.5), SamplingParams(presence_penalty=-2.0)]
    got = process_logits(logits, params, outputs, prompts)
    for row, (p, out) in enumerate(zip(params, outputs)):
        want = logits[row].clone()
        for t in set(out):  # counts over the generated tokens only: the prompt's 4, 5 and 6 are not penalized
            want[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        torch.testing.assert_close(got[row], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from app.engine.sampling import process_logits

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 80, generator=g) * 5
    prompts, outputs = [[5, 6, 7, 5], [10, 11]], [[7, 8, 8], [12, 10, 13]]
    got = process_logits(logits, [SamplingParams(repetition_penalty=penalty)] * 2, outputs, prompts)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for row in range(2):
        want = hf(torch.tensor([prompts[row] + outputs[row]]), logits[row:row + 1].clone())[0]
        torch.testing.assert_close(got[row], want, rtol=0, atol=0)


def test_min_p_keeps_only_tokens_near_the_best():
    probs = torch.tensor([0.40, 0.25, 0.19, 0.16])  # min_p 0.5: the floor is 0.2, so only 0 and 1 remain
    g = torch.Generator().manual_seed(0)
    picks = {sample(torch.log(probs), SamplingParams(temperature=1.0, min_p=0.5), g) for _ in range(300)}
    assert picks == {0, 1}
    assert {sample(torch.log(probs), SamplingParams(temperature=1.0), g) for _ in range(300)} == {0, 1, 2, 3}


def test_top_k_minus_one_is_off_as_in_vllm():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    a = [sample(logits, SamplingParams(temperature=1.0, top_k=-1), g1) for _ in range(50)]
    assert a == [sample(logits, SamplingParams(temperature=1.0, top_k=0), g2) for _ in range(50)]


def test_sampling_is_unbiased():
    """The inverse-CDF draw picks each token with its softmax probability."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    g = torch.Generator().manual_seed(0)
    picks = torch.tensor([sample(logits, SamplingParams(temperature=1.0), g) for _ in range(4000)])
    freq = torch.bincount(picks, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), rtol=0, atol=0.03)


def test_logit_bias_forces_and_bans_tokens(engine):
    greedy = run(engine, max_tokens=6, ignore_eos=True).output_ids
    forced = run(engine, max_tokens=6, ignore_eos=True, logit_bias={4321: 100}).output_ids
    assert forced == [4321] * 6
    banned = run(engine, max_tokens=6, ignore_eos=True, logit_bias={greedy[0]: -100}).output_ids
    assert banned[0] != greedy[0] and greedy[0] not in banned
    sampled = run(engine, max_tokens=6, ignore_eos=True, temperature=1.0, seed=1, logit_bias={4321: 100}).output_ids
    assert sampled == [4321] * 6


def test_penalties_make_greedy_output_repeat_less(engine):
    def most_repeated(ids: list[int]) -> int:
        return max(ids.count(t) for t in ids)

    plain = run(engine, max_tokens=24, ignore_eos=True).output_ids
    assert most_repeated(plain) > 2, "the tiny random model repeats itself under greedy decoding"
    for penalty in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0), dict(repetition_penalty=5.0)):
        penalized = run(engine, max_tokens=24, ignore_eos=True, **penalty).output_ids
        assert penalized != plain and most_repeated(penalized) < most_repeated(plain), penalty
    # negative penalties encourage repetition
    assert most_repeated(run(engine, max_tokens=24, ignore_eos=True, frequency_penalty=-2.0).output_ids) >= \
        most_repeated(plain)


def test_stop_token_ids_end_the_sequence_and_their_text_is_optional(engine):
    greedy = run(engine, max_tokens=12, ignore_eos=True)
    tok = greedy.output_ids[3]
    n = greedy.output_ids.index(tok) + 1
    stopped = run(engine, max_tokens=12, ignore_eos=True, stop_token_ids=[tok])
    assert stopped.output_ids == greedy.output_ids[:n] and stopped.finish_reason == "stop"
    text3 = engine.tokenizer.decode(greedy.output_ids[:n - 1], skip_special_tokens=True)
    text4 = engine.tokenizer.decode(greedy.output_ids[:n], skip_special_tokens=True)
    assert stopped.text == text3
    assert run(engine, max_tokens=12, ignore_eos=True, stop_token_ids=[tok], include_stop_str_in_output=True).text \
        == text4


def test_include_stop_str_in_output_keeps_the_stop_string(engine):
    full = run(engine, max_tokens=24, ignore_eos=True)
    stop = full.text[4:7]
    seq = run(engine, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert seq.finish_reason == "stop" and seq.text == full.text[: full.text.find(stop) + len(stop)]


def test_skip_special_tokens_false_shows_them(engine):
    eos = engine.tokenizer.eos_token_id
    shown = run(engine, max_tokens=2, ignore_eos=True, logit_bias={eos: 100}, skip_special_tokens=False)
    hidden = run(engine, max_tokens=2, ignore_eos=True, logit_bias={eos: 100})
    assert shown.output_ids == hidden.output_ids == [eos, eos]
    assert hidden.text == "" and shown.text == engine.tokenizer.eos_token * 2


def test_token_ids_outside_the_vocabulary_are_a_request_error_naming_the_field(engine):
    for field, value in (("logit_bias", {10**6: 1.0}), ("stop_token_ids", [49152])):
        with pytest.raises(RequestError, match=f"{field}: token id") as e:
            engine.add(PROMPT, SamplingParams(**{field: value}))
        assert e.value.param == field


def test_seeded_requests_are_reproducible_whatever_they_are_batched_with(chat_tiny):
    """The same seeded request alone, and beside other requests (different params, started at other steps)."""
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=21, top_k=40, frequency_penalty=0.5,
                            ignore_eos=True)
    engine = local_engine(chat_tiny, Checkpoint(chat_tiny).tokenizer(), max_num_seqs=4, max_model_len=128)
    alone = engine.generate([PROMPT], params)[0].output_ids
    others = [engine.add([5, 6, 7], SamplingParams(max_tokens=12, temperature=0.7, seed=s, ignore_eos=True,
                                                   repetition_penalty=1.2)) for s in (1, 2)]
    engine.step()
    seq = engine.add(PROMPT, params)
    engine.add([9, 9, 9, 9], SamplingParams(max_tokens=6, presence_penalty=1.0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert seq.output_ids == alone and all(o.finished for o in others)
