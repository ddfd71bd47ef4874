"""Log-probs (issue 22, item 1), exact against transformers' float32 ``log_softmax``.

Engine: the prompt's (``prompt_logprobs``: every prompt position's logits at prefill, through chunked prefill, past
a prefix-cache hit, on one device and on two by a token-sharded layout) and the generated tokens' with their top-k
alternatives (after logit processors, before temperature). HTTP: completions' ``echo`` + ``logprobs`` with
``max_tokens`` 0 and 1 in the legacy shape lm-evaluation-harness parses, chat's shape, streaming, over an aggregated
and a disaggregated pool; gRPC; bad values a 400 naming the field.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_MODEL, grpc_stub, http_client, local_engine, prompts_for, reference_logits

from app.engine.llm_engine import LLMEngine
from app.engine.params import SamplingParams
from app.engine.sampling import process_logits
from strategies.loader import Checkpoint

TOL = 1e-4
MODEL = SHARED_MODEL


def reference(path: str, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log-probs of every position of ``ids`` [T, V] (row j predicts token j + 1)."""
    return torch.log_softmax(reference_logits(path, ids), -1)


def check_entry(entry, ref_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token == token and abs(entry.logprob - ref_row[token].item()) <= TOL
    values, ids = ref_row.topk(k)
    assert [t for t, _ in entry.top] == ids.tolist()
    assert max(abs(lp - v) for (_, lp), v in zip(entry.top, values.tolist())) <= TOL if k else entry.top == []


def check_sequence(path: str, seq, ref_logits_of=None) -> None:
    """Every prompt entry (the first None) and every generated entry against transformers."""
    prompt, out = seq.prompt_ids, seq.output_ids
    ref = reference(path, prompt + out[:-1]) if out else reference(path, prompt)
    if seq.params.prompt_logprobs is not None:
        assert len(seq.prompt_logprobs) == len(prompt) and seq.prompt_logprobs[0].logprob is None
        for j, entry in enumerate(seq.prompt_logprobs[1:], start=1):
            check_entry(entry, ref[j - 1], prompt[j], seq.params.prompt_logprobs)
    if seq.params.logprobs is not None:
        assert len(seq.logprobs) == len(out)
        for i, (entry, token) in enumerate(zip(seq.logprobs, out)):
            row = ref[len(prompt) - 1 + i]
            check_entry(entry, ref_logits_of(row, out[:i]) if ref_logits_of else row, token, seq.params.logprobs)


def test_engine_logprobs_match_transformers_chunked_batched_and_after_a_prefix_hit(tiny_models):
    path = tiny_models["gqa"]
    a, b, c = prompts_for(512, lengths=(21, 9, 5), seed=7)
    engine = local_engine(path, max_num_batched_tokens=16)  # chunks of 16: a's prompt spans two steps
    scored = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    plain = SamplingParams(max_tokens=4, ignore_eos=True)
    # sampled at temperature 0.7: the log-probs are the model's, before temperature
    hot = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.7, seed=3, logprobs=2)
    seqs = engine.generate([a], scored) + [engine.add(b, plain), engine.add(c, hot)]
    while engine.has_work():
        engine.step()
    check_sequence(path, seqs[0])
    check_sequence(path, seqs[2])
    assert seqs[1].logprobs == [] and seqs[1].prompt_logprobs is None  # only rows that asked pay
    # the same prompt again: its blocks are in the prefix cache, yet every position is scored
    again = engine.generate([a], scored)[0]
    check_sequence(path, again)
    assert again.cached_tokens == 0 and engine.generate([a], plain)[0].cached_tokens > 0
    # the prompt only (max_tokens 0): scored, nothing generated
    only = engine.generate([b], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert only.finish_reason == "length" and only.output_ids == []
    check_sequence(path, only)


def test_generated_logprobs_are_after_penalties_and_bias(tiny_models):
    path = tiny_models["mha"]
    prompt = prompts_for(512, lengths=(11,), seed=2)[0]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=4, repetition_penalty=1.3,
                            frequency_penalty=0.5, logit_bias={7: 3.0, 9: -2.0})
    seq = local_engine(path).generate([prompt], params)[0]

    def processed(ref_row: torch.Tensor, before: list[int]) -> torch.Tensor:
        logits = reference_logits(path, prompt + before)[-1]
        return torch.log_softmax(process_logits(logits[None], [params], [before], [prompt])[0], -1)

    check_sequence(path, seq, processed)


def test_prompt_logprobs_on_two_devices_by_a_token_sharded_layout(ray_session, tiny_models):
    from placement.workers import start_group

    path = tiny_models["odd"]
    prompts = prompts_for(512, lengths=(13, 6), seed=5)
    group = start_group(2, dict(model=path, block_size=4, num_blocks=64))
    try:
        engine = LLMEngine(group, None, [], max_model_len=64, num_blocks=64, block_size=4, max_num_seqs=4,
                           max_num_batched_tokens=8)
        params = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=2)
        for strategy in ("weight_gathered", "megatron"):
            for seq in engine.generate(prompts, params, strategy):
                check_sequence(path, seq)
    finally:
        group.shutdown()


# -- through the Serve app -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(pair_app, chat_tiny):
    """The session's ``pair_app`` (conftest: an aggregated and a disaggregated pool of one device each), an HTTP client
    on it and the model's tokenizer."""
    with http_client(pair_app.ports, pair_app.route) as client:
        yield pair_app, client, Checkpoint(chat_tiny).tokenizer()


@pytest.fixture
def http(served):
    return served[1]


@pytest.fixture
def tok(served):
    return served[2]


def events(http, path: str, body: dict, pool: str = "one") -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}, headers={"x-dynpart-pool": pool}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def lm_eval_loglikelihood(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """What lm-evaluation-harness's local-completions model reads of a choice (``parse_logprobs``): the continuation's
    log-likelihood and whether it is the greedy one."""
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))


@pytest.mark.parametrize("pool", ["one", "split"])
def test_completions_echo_logprobs_in_the_shape_lm_eval_parses(http, chat_tiny, tok, pool):
    context, continuation = tok("The capital of France")["input_ids"], tok(" is Paris")["input_ids"]
    ids = context + continuation
    ref = reference(chat_tiny, ids)
    got = {}
    for max_tokens in (1, 0):
        r = http.post("/v1/completions", headers={"x-dynpart-pool": pool},
                      json={"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": max_tokens})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        n = len(ids) + max_tokens
        assert [len(lp[k]) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")] == [n] * 4
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["tokens"][:len(ids)] == [tok.decode([t]) for t in ids]
        assert choice["text"].startswith(tok.decode(ids)) and r.json()["usage"]["completion_tokens"] == max_tokens
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
        for j in range(1, len(ids)):
            assert abs(lp["token_logprobs"][j] - ref[j - 1, ids[j]].item()) <= TOL
            top = ref[j - 1].topk(1)
            assert tok.decode([top.indices[0].item()]) in lp["top_logprobs"][j]
            assert 1 <= len(lp["top_logprobs"][j]) <= 2  # the top one and the chosen one
        got[max_tokens] = choice
    loglik, greedy = lm_eval_loglikelihood(got[1], len(context))
    want = sum(ref[j - 1, ids[j]].item() for j in range(len(context), len(ids)))
    assert abs(loglik - want) <= TOL * len(continuation)
    assert greedy == all(ref[j - 1].argmax().item() == ids[j] for j in range(len(context), len(ids)))
    assert got[0]["logprobs"]["token_logprobs"] == got[1]["logprobs"]["token_logprobs"][:-1]


@pytest.mark.parametrize("pool", ["one", "split"])
def test_streamed_logprobs_equal_the_whole_answers(http, pool):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 3, "echo": True}
    whole = http.post("/v1/completions", json=body, headers={"x-dynpart-pool": pool}).json()["choices"][0]
    chunks = [e["choices"][0] for e in events(http, "/v1/completions", body, pool) if e["choices"]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks if c["logprobs"] for v in c["logprobs"][key]] == whole["logprobs"][key], key
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    whole = http.post("/v1/chat/completions", json=chat, headers={"x-dynpart-pool": pool}).json()["choices"][0]
    streamed = [c for e in events(http, "/v1/chat/completions", chat, pool) for ch in e["choices"]
                if ch["logprobs"] for c in ch["logprobs"]["content"]]
    assert streamed == whole["logprobs"]["content"]


def test_chat_logprobs_in_openai_chat_shape(http, chat_tiny, tok):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4,
                                                "temperature": 0, "ignore_eos": True, "logprobs": True,
                                                "top_logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 4 and set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = tok(choice["message"]["content"], add_special_tokens=False)["input_ids"]
    ref = reference(chat_tiny, ids + out)
    first = content[0]
    assert abs(first["logprob"] - ref[len(ids) - 1].max().item()) <= TOL  # greedy: the most likely token
    assert first["bytes"] == list(first["token"].encode()) and len(first["top_logprobs"]) == 3
    assert first["top_logprobs"][0]["logprob"] == first["logprob"]
    assert [t["logprob"] for t in first["top_logprobs"]] == sorted((t["logprob"] for t in first["top_logprobs"]),
                                                                   reverse=True)
    plain = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                    "logprobs": True}).json()["choices"][0]["logprobs"]["content"]
    assert [c["top_logprobs"] for c in plain] == [[], []]


def test_logprobs_over_grpc(served, http):
    from app.serve.protos import dynpart_pb2 as pb

    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, "echo": True}
    want = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    with grpc_stub(served[0].ports, served[0].name) as stub:
        reply = stub.Generate(pb.GenerateRequest(prompt=body["prompt"], max_tokens=3, ignore_eos=True, logprobs=2,
                                                 prompt_logprobs=2))
        chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt=body["prompt"], max_tokens=3, ignore_eos=True,
                                                             logprobs=2)))
    entries = [*reply.prompt_logprobs, *reply.logprobs]
    assert not entries[0].HasField("logprob") and len(reply.logprobs) == 3
    assert [e.token for e in entries] == want["tokens"]
    assert [e.logprob if e.HasField("logprob") else None for e in entries] == pytest.approx(want["token_logprobs"])
    assert [len(e.top_logprobs) for e in reply.logprobs] == [2] * 3
    assert [e.logprob for c in chunks for e in c.logprobs] == [e.logprob for e in reply.logprobs]


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),  # only with echo
    ("/v1/completions", {"n": 65, "logprobs": 1}, "n"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": "yes please"}, "logprobs"),
])
def test_bad_logprobs_values_are_a_400_naming_the_field_and_the_service_stays_healthy(http, path, fields, param):
    body = {"model": MODEL, "max_tokens": 2, **fields,
            **({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"})}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"], error
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                              "logprobs": 0}).status_code == 200


def test_a_prompt_preempted_while_being_scored_is_scored_once_and_exactly(tiny_models):
    """Few KV blocks: the older sequence's decode preempts the one whose prompt is being scored chunk by chunk; it
    recomputes and its prompt log-probs come out once per token, as transformers'."""
    path = tiny_models["gqa"]
    a, b = prompts_for(512, lengths=(20, 40), seed=11)
    engine = local_engine(path, num_blocks=4, block_size=16, max_num_batched_tokens=8, max_model_len=64)
    first = engine.add(a, SamplingParams(max_tokens=40, ignore_eos=True))
    scored = engine.add(b, SamplingParams(max_tokens=2, ignore_eos=True, logprobs=1, prompt_logprobs=2))
    while engine.has_work():
        engine.step()
    assert scored.preemptions > 0 and first.finish_reason == scored.finish_reason == "length"
    check_sequence(path, scored)
