"""Several choices per request (issue 22, items 2 and 3): a completions ``prompt`` as a list of strings or of
token-id lists, ``n`` choices per prompt sharing the prompt's prefill through the prefix cache, ``best_of``, streamed
and over gRPC; ``suffix`` and too many choices a 400 naming the field.

Against the session's ``pair_app`` (conftest: the tiny chat model, an aggregated pool and a disaggregated one, one device
each; test_logprobs uses it too), with real HTTP and gRPC clients.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import SHARED_MODEL, grpc_stub, http_client

from app.serve.api import MAX_CHOICES
from strategies.shapes import DEFAULT_BLOCK_SIZE
from strategies.loader import Checkpoint

MODEL = SHARED_MODEL
BLOCK = DEFAULT_BLOCK_SIZE  # the pools' KV block
GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
TOL = 1e-4


@pytest.fixture(scope="module")
def app(pair_app, chat_tiny) -> SimpleNamespace:
    """The app's ports and name, an HTTP client on it, the model's tokenizer."""
    with http_client(pair_app.ports, pair_app.route) as client:
        yield SimpleNamespace(ports=pair_app.ports, name=pair_app.name, http=client,
                              tok=Checkpoint(chat_tiny).tokenizer())


http = pytest.fixture(lambda app: app.http, name="http")
tok = pytest.fixture(lambda app: app.tok, name="tok")


def complete(http, pool: str = "one", path: str = "/v1/completions", **body) -> dict:
    r = http.post(path, json={"model": MODEL, **body}, headers={"x-dynpart-pool": pool})
    assert r.status_code == 200, r.text
    return r.json()


def events(http, body: dict, path: str = "/v1/completions", pool: str = "one") -> list[dict]:
    with http.stream("POST", path, json={"model": MODEL, **body, "stream": True},
                     headers={"x-dynpart-pool": pool}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("pool", ["one", "split"])
def test_a_list_of_prompts_answers_each_as_alone_in_order(http, tok, pool):
    alone = [complete(http, pool, prompt=p, max_tokens=6, **GREEDY) for p in PROMPTS]
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    for prompt in (PROMPTS, ids):
        got = complete(http, pool, prompt=prompt, max_tokens=6, user="u-1", **GREEDY)
        assert [c["index"] for c in got["choices"]] == [0, 1, 2]
        assert [c["text"] for c in got["choices"]] == [a["choices"][0]["text"] for a in alone]
        assert got["usage"]["prompt_tokens"] == sum(map(len, ids))
        assert got["usage"]["completion_tokens"] == 18


def test_lm_eval_loglikelihood_request_with_a_list_prompt(http, tok):
    """lm-evaluation-harness's local-completions body for a batch of loglikelihood requests: token-id lists, echo,
    logprobs 1, max_tokens 1 (and 0), temperature 0, a seed."""
    ids = [tok(c + k)["input_ids"] for c, k in (("The capital of France", " is Paris"), ("Two plus two", " is four"))]
    for max_tokens in (1, 0):
        body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0, "seed": 1234}
        batch = sorted(complete(http, **body)["choices"], key=lambda c: c["index"])
        for choice, prompt in zip(batch, ids, strict=True):
            alone = complete(http, **{**body, "prompt": prompt})["choices"][0]
            assert choice["text"] == alone["text"]
            assert len(choice["logprobs"]["token_logprobs"]) == len(prompt) + max_tokens
            assert choice["logprobs"]["token_logprobs"][0] is None
            assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
                alone["logprobs"]["token_logprobs"][1:], abs=TOL)
            assert choice["logprobs"]["tokens"] == alone["logprobs"]["tokens"]


@pytest.mark.parametrize("pool", ["one", "split"])
def test_n_greedy_choices_are_the_greedy_answer_and_the_prompt_is_prefilled_once(http, tok, pool):
    prompt = f"In a village of the {pool} valley there lived an old miller who had three sons and a cat"
    ids = tok(prompt)["input_ids"]
    full = (len(ids) - 1) // BLOCK * BLOCK
    assert full >= BLOCK
    got = complete(http, pool, prompt=prompt, n=3, max_tokens=5, **GREEDY)
    assert [c["index"] for c in got["choices"]] == [0, 1, 2]
    one = complete(http, pool, prompt=prompt, max_tokens=5, **GREEDY)["choices"][0]["text"]
    assert [c["text"] for c in got["choices"]] == [one] * 3
    usage = got["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(ids), 15)
    # the first computed the whole prompt; the other two found its full blocks cached
    assert usage["dynpart"]["cached_tokens"] == 2 * full, usage


def test_seeded_n_is_reproducible_distinct_and_seed_plus_j(http):
    body = {"prompt": "Once upon a time", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    first, again = complete(http, **body), complete(http, **body)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    assert len(set(texts)) > 1
    alone = [complete(http, **{**body, "n": 1, "seed": 7 + j})["choices"][0]["text"] for j in range(3)]
    assert texts == alone


def test_best_of_keeps_the_choice_with_the_highest_cumulative_logprob(http):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 11, "ignore_eos": True,
            "logprobs": 0}
    sampled = complete(http, **body, n=3)["choices"]
    cumulative = [sum(c["logprobs"]["token_logprobs"]) for c in sampled]
    order = sorted(range(3), key=lambda j: -cumulative[j])
    best = complete(http, **body, best_of=3)["choices"]
    assert len(best) == 1 and best[0]["text"] == sampled[order[0]]["text"] and best[0]["index"] == 0
    two = complete(http, **body, n=2, best_of=3)["choices"]
    assert [c["text"] for c in two] == [sampled[j]["text"] for j in order[:2]] and [c["index"] for c in two] == [0, 1]
    quiet = complete(http, **{**body, "logprobs": None}, best_of=3)
    assert quiet["choices"][0]["text"] == best[0]["text"] and quiet["choices"][0]["logprobs"] is None
    assert quiet["usage"]["completion_tokens"] == 18  # every sampled sequence's tokens


def test_streamed_choices_interleave_by_index_and_equal_the_whole_answers(http):
    body = {"prompt": PROMPTS[:2], "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 3, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    whole = complete(http, **body)
    chunks = events(http, body)
    texts, finished = {}, {}
    for e in chunks[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finished[c["index"]] = finished.get(c["index"], 0) + 1
    assert texts == {c["index"]: c["text"] for c in whole["choices"]} and finished == {0: 1, 1: 1, 2: 1, 3: 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    chat = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4, **GREEDY}
    got = complete(http, path="/v1/chat/completions", **chat)["choices"]
    assert [c["index"] for c in got] == [0, 1] and got[0]["message"] == got[1]["message"]
    deltas = [c for e in events(http, chat, "/v1/chat/completions") for c in e["choices"]]
    for i in (0, 1):
        mine = [c["delta"] for c in deltas if c["index"] == i]
        assert mine[0]["role"] == "assistant" and "".join(d.get("content", "") for d in mine) == \
            got[i]["message"]["content"]


def test_n_over_grpc(app):
    from app.serve.protos import dynpart_pb2 as pb

    req = pb.GenerateRequest(prompt="Once upon a time", max_tokens=4, ignore_eos=True, n=2, temperature=1.0, seed=5,
                             pool="one")
    with grpc_stub(app.ports, app.name) as stub:
        reply = stub.Generate(req)
        chunks = list(stub.GenerateStream(req))
    assert [c.index for c in reply.choices] == [0, 1] and reply.text == reply.choices[0].text
    assert [len(c.token_ids) for c in reply.choices] == [4, 4]
    for i in (0, 1):
        assert [t for c in chunks if c.index == i for t in c.token_ids] == list(reply.choices[i].token_ids)


@pytest.mark.parametrize("fields, param", [
    ({"suffix": "}"}, "suffix"),
    ({"n": MAX_CHOICES + 1}, "n"),
    ({"prompt": ["a", "b"], "n": MAX_CHOICES // 2 + 1}, "n"),
    ({"prompt": ["a", "b"], "best_of": MAX_CHOICES}, "best_of"),
    ({"prompt": ["a"] * (MAX_CHOICES + 1)}, "prompt"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"n": 0}, "n"),
])
def test_suffix_and_too_many_choices_are_a_400_naming_the_field(http, fields, param):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"], error
    assert http.get("/health").status_code == 200
    assert complete(http, prompt="Hi", max_tokens=1)["usage"]["completion_tokens"] == 1
