"""The Serve application end to end: real Serve, real httpx, the official openai client and a real gRPC client.

One app for the module (deploying is the slow part): three pools of the tiny chat model —
``fast`` (1 device priced as an L4, context 512), ``long`` (2 CPU devices, context 1024) and ``split`` (the same as
``long``, disaggregated: prefill and decode replicas). Unpinned requests go where the planner predicts: short
prompts to ``fast`` (fastest predicted), prompts that do not fit its context to ``long`` (listed before ``split``).
The pools run the planner as calibrated (``online_correction: false``), so the tests can predict each choice; the
correction's own effect is tests/test_correction.py's.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import httpx
import openai
import pytest
from conftest import deployed, http_client, metric_samples, reference_greedy
from conftest import grpc_stub as stub_for

from cost import get_hardware, plan_prefill
from strategies.layout import STRATEGY_NAMES
from strategies.loader import Checkpoint

APP = "serve-api"
MODEL = "tiny-chat"
POOLS = [
    dict(name="fast", hardware="L4", devices=1, max_model_len=512, max_num_seqs=4, max_ongoing_requests=2,
         max_queued_requests=1, online_correction=False),
    dict(name="long", hardware="cpu", devices=2, max_model_len=1024, max_num_seqs=4, online_correction=False),
    dict(name="split", hardware="cpu", devices=2, max_model_len=1024, max_num_seqs=4, disaggregated=True,
         online_correction=False),
]
GREEDY = {"temperature": 0, "ignore_eos": True}
MAX_TOKENS_LIMIT = 8192  # above the 4096 the request model once capped max_tokens at
# A layout no pool of this app builds at start (not a named strategy, not on the tiny model's front for 2 CPU devices)
UNBUILT = "residual=TOK qkv=col attn=heads o=replicated gate_up=gathered down=replicated"


@pytest.fixture(scope="module")
def app_ports(serve_session, chat_tiny):
    args = {"model": chat_tiny, "served_model_name": MODEL, "pools": POOLS, "graceful_shutdown_s": 1,
            "max_tokens_limit": MAX_TOKENS_LIMIT}
    with deployed(serve_session, args, APP) as ports:
        yield ports


@pytest.fixture(scope="module")
def http(app_ports):
    with http_client(app_ports) as client:
        yield client


@pytest.fixture(scope="module")
def oai(app_ports):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{app_ports['http']}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_stub(app_ports):
    with stub_for(app_ports, APP) as s:
        yield s


@pytest.fixture(scope="module")
def tok(chat_tiny):
    return Checkpoint(chat_tiny).tokenizer()


def expected_routes(path: str, n: int, max_tokens: int) -> set[tuple[str, str]]:
    """The pools (and their strategies) the planner predicts fastest for an idle app, among those whose context
    holds the request. Pools of the same hardware and device count tie here; the router then takes the one whose
    replicas measure the faster decode step, so any of them is right."""
    shape = Checkpoint(path).shape
    choices = {p["name"]: plan_prefill(shape, get_hardware(p["hardware"]), p["devices"], n) for p in POOLS
               if n + max_tokens <= min(p["max_model_len"], shape.max_position_embeddings)}
    best = min(c.time_s for c in choices.values())
    return {(name, c.strategy) for name, c in choices.items() if c.time_s == pytest.approx(best)}


def test_completion_is_greedy_transformers_and_names_pool_strategy(http, chat_tiny, tok):
    prompt = "The quick brown fox"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tok(prompt)["input_ids"]
    assert body["choices"][0]["text"] == tok.decode(reference_greedy(chat_tiny, ids, 12), skip_special_tokens=True)
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(ids), 12)
    d = usage["dynpart"]
    assert (r.headers["x-dynpart-pool"], r.headers["x-dynpart-strategy"]) == (d["pool"], d["strategy"])
    assert d["prefill_ms"] > 0 and d["ttft_ms"] >= d["prefill_ms"] and d["tpot_ms"] > 0
    # and why that pool: the router's prediction there, the first token before the last (11 decode steps after it)
    predicted_ttft, predicted = (float(r.headers[f"x-dynpart-predicted{k}-ms"]) for k in ("-ttft", ""))
    assert 0 < predicted_ttft < predicted


def test_streaming_completion_equals_non_streaming(oai):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    whole = oai.completions.create(**args)
    chunks = list(oai.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.model_extra["dynpart"]["pool"] == whole.usage.model_extra["dynpart"]["pool"]


def test_chat_applies_template_streams_and_matches_reference(oai, chat_tiny, tok):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=10,
                                                       temperature=0, extra_body={"ignore_eos": True})
    whole = raw.parse()
    assert raw.headers["x-dynpart-pool"] == whole.usage.model_extra["dynpart"]["pool"]
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == tok.decode(reference_greedy(chat_tiny, list(ids), 10),
                                                          skip_special_tokens=True)
    stream = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True}, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_sse_ends_with_done_and_carries_headers(http):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True, **GREEDY}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-dynpart-pool"] and r.headers["x-dynpart-strategy"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_models_and_health(http, oai):
    assert http.get("/health").json()["status"] == "ok"
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_only_the_engines_load_torch(http):
    """The ingress and the load board compute nothing: they never load torch (each process would spend ~3 s of CPU
    importing it at start and hold a few hundred MB), while the engine replicas do; the ingress has served by now."""
    import psutil

    assert http.get("/health").json()["status"] == "ok"
    procs = {}
    for p in psutil.process_iter(["cmdline"]):
        name = " ".join(p.info["cmdline"] or [])
        for role in ("Ingress", "LoadBoard", "fast"):
            if f"ServeReplica:{APP}:{role}" in name:
                procs.setdefault(role, []).append(p)
    assert sorted(procs) == ["Ingress", "LoadBoard", "fast"], procs

    def loaded_torch(p) -> bool:
        return any("libtorch" in m.path for m in p.memory_maps(grouped=True))

    assert not any(loaded_torch(p) for role in ("Ingress", "LoadBoard") for p in procs[role])
    assert all(loaded_torch(p) for p in procs["fast"])  # the check sees torch where it is

def test_short_and_long_prompts_routed_as_the_planner_predicts(http, chat_tiny, tok):
    """One token each, so the price is the planner's prefill alone: with decode steps in it, the pools' measured step
    times (which the suite's other load moves) decide between pools that the planner's prefill does not."""
    seen = {}
    for prompt in ("Hello", "Hello " * 600):
        n = len(tok(prompt)["input_ids"])
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1, **GREEDY})
        assert r.status_code == 200, r.text
        seen[n] = (r.headers["x-dynpart-pool"], r.headers["x-dynpart-strategy"])
        assert seen[n] in expected_routes(chat_tiny, n, 1)
    assert len(set(seen.values())) == 2  # the two prompts really went different ways


def test_disaggregated_equals_aggregated_token_for_token(grpc_stub, chat_tiny):
    from app.serve.protos import dynpart_pb2 as pb

    prompt = "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole"
    out = {}
    for pool in ("long", "split"):
        reply = grpc_stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=24, ignore_eos=True, pool=pool))
        assert reply.dynpart.pool == pool and reply.finish_reason == "length"
        out[pool] = list(reply.token_ids)
    ids = Checkpoint(chat_tiny).tokenizer()(prompt)["input_ids"]
    assert out["split"] == out["long"] == reference_greedy(chat_tiny, ids, 24)


def test_grpc_stream_equals_unary_and_reports_pool(grpc_stub):
    from app.serve.protos import dynpart_pb2 as pb

    """The prompt is sent once before, so both find its prefix cached the same way (a step's layout depends on it)."""
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Tell me a story")], max_tokens=12,
                             ignore_eos=True)
    grpc_stub.Generate(req)
    whole = grpc_stub.Generate(req)
    chunks = list(grpc_stub.GenerateStream(req))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert chunks[0].dynpart.pool == chunks[-1].dynpart.pool == whole.dynpart.pool
    assert chunks[-1].dynpart.cached_tokens == whole.dynpart.cached_tokens
    assert chunks[-1].finish_reason == "length" and chunks[-1].dynpart.strategy == whole.dynpart.strategy
    assert whole.prompt_tokens > 0 and whole.completion_tokens == 12


@pytest.mark.parametrize("body, headers, status, says", [
    ({"prompt": "x", "bogus": 1}, {}, 400, "bogus"),
    ({"prompt": "x", "temperature": 5}, {}, 400, "temperature"),
    ({"prompt": ""}, {}, 400, "empty"),
    ({"prompt": "x", "max_tokens": 2000}, {}, 400, "context limit"),
    ({"prompt": [1, 10**6]}, {}, 400, "vocabulary"),
    ({"prompt": "x", "model": "gpt-4"}, {}, 404, "gpt-4"),
    ({"prompt": "x"}, {"x-dynpart-pool": "nope"}, 400, "unknown pool"),
    ({"prompt": "x"}, {"x-dynpart-strategy": "fastest"}, 400, "unknown prefill strategy"),
])
def test_bad_input_is_a_clear_4xx(http, body, headers, status, says):
    r = http.post("/v1/completions", json={"model": MODEL, **body}, headers=headers)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_bad_grpc_input_is_invalid_argument(grpc_stub):
    from app.serve.protos import dynpart_pb2 as pb

    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=2000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context limit" in e.value.details()


def test_overload_is_503(app_ports):
    """``fast`` admits 2 running + 1 queued request: of 8 at once, the rest are refused with 503."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app_ports['http']}", timeout=120) as c:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 48, **GREEDY}
            return await asyncio.gather(*(c.post("/v1/completions", json=body, headers={"x-dynpart-pool": "fast"})
                                          for _ in range(8)))

    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes


def test_when_two_pools_fit_the_queue_term_decides(app_ports, chat_tiny):
    """``long`` and ``split`` are the same hardware and context: idle, the first listed wins; with prompt tokens
    waiting on ``long`` the request goes to ``split``; with more waiting on ``split``, back to ``long``. The router
    runs here with the app's real deployment handles and the planner's real predictions (the tokens ahead are
    prefilled in one batch with the request, as the engine does)."""
    from ray import serve

    from app.serve.config import AppConfig
    from app.serve.dispatch import PoolHandles
    from app.serve.router import Router

    cfg = AppConfig.model_validate({"model": chat_tiny, "pools": POOLS})
    handles = {"fast": PoolHandles(engine=serve.get_deployment_handle("fast", APP)),
               "long": PoolHandles(engine=serve.get_deployment_handle("long", APP)),
               "split": PoolHandles(prefill=serve.get_deployment_handle("split-prefill", APP),
                                    decode=serve.get_deployment_handle("split-decode", APP))}
    router = Router(cfg, handles)
    n = 700  # fits long and split (1024 tokens), not fast (512)

    async def picks() -> list:
        idle = await router.pick_pool(n, 8)
        router.dispatch.queued["long"] = 2000
        long_busy = await router.pick_pool(n, 8)
        router.dispatch.queued["split"] = 3000
        both_busy = await router.pick_pool(n, 8)
        return [idle, long_busy, both_busy]

    idle, long_busy, both_busy = asyncio.run(picks())
    assert [r.pool.name for r in (idle, long_busy, both_busy)] == ["long", "split", "long"]
    assert long_busy.predicted_s == pytest.approx(idle.predicted_s)  # split's own prefill, nothing queued there
    shape, hw = Checkpoint(chat_tiny).shape, get_hardware("cpu")
    available = asyncio.run(router.available("long"))
    batched = plan_prefill(shape, hw, 2, [n, 2000], available=available).time_s
    assert both_busy.ttft_s == pytest.approx(batched)  # prefilled in one batch with the 2000 tokens ahead
    assert both_busy.predicted_s > idle.predicted_s


def pool_totals(samples: list, pool: str) -> dict[str, float]:
    """The samples labelled with ``pool``, summed per name (and status: ``ray_dynpart_requests_total[200]``)."""
    out: dict[str, float] = {}
    for s in samples:
        if s.labels.get("pool") == pool:
            key = s.name + ("" if "status" not in s.labels else f"[{s.labels['status']}]")
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_prometheus_metrics_count_requests(http, ray_session):
    """Scraped from Ray's metrics endpoint as Prometheus would: the request counter and the latency histograms
    move with the requests served, and every engine replica reports its queued tokens."""
    def samples() -> dict[str, float]:
        return pool_totals(metric_samples(ray_session), "fast")

    before = samples()
    for _ in range(3):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, **GREEDY},
                      headers={"x-dynpart-pool": "fast"})
        assert r.status_code == 200
    deadline, after = time.monotonic() + 60, before
    while time.monotonic() < deadline:  # Ray exports metrics every few seconds
        after = samples()
        if after.get("ray_dynpart_requests_total[200]", 0) >= before.get("ray_dynpart_requests_total[200]", 0) + 3:
            break
        time.sleep(1)
    # at least these three (an earlier test's requests may be exported in the same window)
    assert after.get("ray_dynpart_requests_total[200]", 0) - before.get("ray_dynpart_requests_total[200]", 0) >= 3
    for hist in ("ray_dynpart_ttft_seconds_count", "ray_dynpart_prefill_seconds_count"):
        assert after.get(hist, 0) - before.get(hist, 0) >= 3, hist
    assert "ray_dynpart_queued_tokens" in after


def test_a_pool_header_cannot_create_metric_series(http, ray_session):
    """A refused request is counted under a configured pool name or ``unknown``, never under the pool name it
    sent: a client naming a new pool in every request would otherwise add a Prometheus series each time."""
    bogus = f"flood-{uuid.uuid4().hex[:12]}"
    count = "ray_dynpart_requests_total[400]"
    before = pool_totals(metric_samples(ray_session), "unknown").get(count, 0)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                  headers={"x-dynpart-pool": bogus})
    assert r.status_code == 400 and "unknown pool" in r.json()["error"]["message"], r.text
    deadline = time.monotonic() + 60
    while True:  # Ray exports metrics every few seconds
        samples = metric_samples(ray_session)
        if pool_totals(samples, "unknown").get(count, 0) > before or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert pool_totals(samples, "unknown").get(count, 0) >= before + 1  # counted, as pool "unknown"
    assert not [s for s in samples if bogus in s.labels.values()]


def test_a_grpc_request_over_max_body_bytes_is_resource_exhausted_as_http_is_413(http, grpc_stub):
    """Too large is too large on both protocols: HTTP's 413 and gRPC's RESOURCE_EXHAUSTED (its code for a message
    over the limit, not INVALID_ARGUMENT), with the same message."""
    from app.serve.protos import dynpart_pb2 as pb

    prompt = "x" * (1 << 20)  # the app's max_body_bytes is the default, 1 MiB
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=2))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details() == r.json()["error"]["message"] == "the request body is larger than this server's " \
        "limit of 1048576 bytes"


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages", "text only"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens",
     f"exceeds this server's limit of {MAX_TOKENS_LIMIT}"),
])
def test_a_client_mistake_is_a_400_naming_its_field(http, path, body, param, says):
    r = http.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and says in error["message"], error


def test_a_layout_no_pool_built_is_a_400_and_one_built_at_start_is_served(http, grpc_stub):
    """A header cannot make a replica build a layout in a serving step: a label no pool built at start is a 400
    naming it and what each pool runs (HTTP and gRPC); a layout a pool built (a front member it offers, a named
    strategy as static policies use) runs where it was asked for."""
    from ray import serve

    from app.serve.protos import dynpart_pb2 as pb

    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **GREEDY},
                  headers={"x-dynpart-strategy": UNBUILT})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"prefill strategy {UNBUILT!r} cannot run" in message and "did not build it at start" in message
    assert all(f"pool {p['name']} did not build it at start (it runs 'megatron'" in message for p in POOLS), message
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2, strategy=UNBUILT, pool="long"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pool long did not build it" in e.value.details()
    offered = serve.get_deployment_handle("long", APP).info.remote().result(timeout_s=60)["available"]
    label = next(s for s in offered if s not in STRATEGY_NAMES)
    for strategy in (label, "weight_gathered"):
        reply = grpc_stub.Generate(pb.GenerateRequest(prompt="Hello there", max_tokens=2, ignore_eos=True,
                                                      pool="long", strategy=strategy))
        assert reply.dynpart.strategy == strategy and reply.completion_tokens == 2


def test_max_tokens_is_capped_by_the_configured_limit_not_4096(http, grpc_stub):
    """``max_tokens_limit`` is 8192 here: 5000 tokens are within it (this tiny model's context is what refuses
    them), HTTP and gRPC alike; past 8192 the limit itself is named."""
    from app.serve.protos import dynpart_pb2 as pb

    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5000})
    assert r.status_code == 400 and "exceeds the context limit of every pool" in r.json()["error"]["message"], r.text
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=5000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context limit" in e.value.details()
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10**40})
    assert r.status_code == 400 and f"limit of {MAX_TOKENS_LIMIT}" in r.json()["error"]["message"], r.text


def test_a_max_tokens_never_sent_is_what_fits(http, tok):
    """A chat request without ``max_tokens`` gets the chat default (256) lowered to what the context leaves after
    its prompt, in the pools it may go to (here ``long``'s 1024 tokens, or ``fast``'s 512 when pinned), instead of a
    400 about a value it never sent."""
    for pool, context, parts in ((None, 1024, 5), ("fast", 512, 2)):
        messages = [{"role": "user", "content": "hello " * 160}] * parts
        n = len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        assert context - 256 < n < context, n  # the default would not fit
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **GREEDY},
                      headers={"x-dynpart-pool": pool} if pool else {})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (n, context - n)
        assert r.json()["choices"][0]["finish_reason"] == "length"


# -- the OpenAI and vLLM fields real clients send (issue 22, items 2, 4 and 5) ----------------------------------------

# What ``vllm bench serve`` sends for every request of its random dataset (backend openai-completions, streaming)
VLLM_BENCH_BODY = {"model": MODEL, "prompt": "the random dataset decodes random token ids into text",
                   "max_tokens": 8, "temperature": 0.0, "repetition_penalty": 1.0, "logprobs": None,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def test_a_vllm_bench_serve_request_is_served(http):
    import json

    with http.stream("POST", "/v1/completions", json=VLLM_BENCH_BODY) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_continuous_usage_stats_put_each_choices_usage_so_far_in_every_chunk(http):
    """vLLM's ``continuous_usage_stats`` (guidellm sends it with every streamed request): with ``include_usage``,
    every chunk carries its choice's prompt tokens and the tokens generated so far; the last chunk the totals."""
    import json

    body = {**VLLM_BENCH_BODY, "n": 2, "temperature": 1.0, "seed": 1,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/completions", json=body, headers={"x-dynpart-pool": "long"}) as r:  # room for 2
        assert r.status_code == 200, r.read()
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines()
                  if line and line != "data: [DONE]"]
    *chunks, last = events
    assert chunks and all(e["choices"] and e["usage"] for e in chunks)
    prompt = chunks[0]["usage"]["prompt_tokens"]
    for index in (0, 1):
        mine = [e["usage"] for e in chunks if e["choices"][0]["index"] == index]
        done = [u["completion_tokens"] for u in mine]
        assert done == sorted(done) and done[-1] == 8 and {u["prompt_tokens"] for u in mine} == {prompt}
        assert all(u["total_tokens"] == prompt + u["completion_tokens"] for u in mine)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 16
    plain = {**VLLM_BENCH_BODY, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/completions", json=plain) as r:
        assert r.status_code == 200 and "usage" not in r.read().decode()


FORCED = 4321  # a token id of the tiny chat model's vocabulary


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_logit_bias_forces_a_token_over_http(http, tok, path):
    body = {"model": MODEL, "max_tokens": 4, "logit_bias": {str(FORCED): 100}, "temperature": 0.8, "seed": 3,
            "ignore_eos": True, **({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path
                                   else {"prompt": "Hi"})}
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if "chat" in path else choice["text"]
    assert text == tok.decode([FORCED] * 4, skip_special_tokens=True)


def test_sampling_controls_over_grpc_alike_on_aggregated_and_disaggregated_pools(grpc_stub):
    """Penalties, bias and min_p reach the engine through gRPC; a disaggregated pool (the first token sampled by the
    prefill replica, the rest by the decode replica) gives the same tokens as an aggregated one."""
    from app.serve.protos import dynpart_pb2 as pb

    def tokens(pool: str, **fields) -> list[int]:
        req = pb.GenerateRequest(prompt="The quick brown fox", max_tokens=16, ignore_eos=True, pool=pool, **fields)
        return list(grpc_stub.Generate(req).token_ids)

    plain = tokens("long")
    penalized = dict(frequency_penalty=2.0, presence_penalty=0.5, repetition_penalty=1.5, min_p=0.1,
                     logit_bias={plain[0]: -100.0})
    got = tokens("long", **penalized)
    assert got != plain and plain[0] not in got
    assert max(got.count(t) for t in got) <= max(plain.count(t) for t in plain)
    assert tokens("split", **penalized) == got
    assert tokens("split", logit_bias={FORCED: 100.0}, temperature=1.0, seed=5) == [FORCED] * 16
    stopped = grpc_stub.Generate(pb.GenerateRequest(prompt="The quick brown fox", max_tokens=16, ignore_eos=True,
                                                    pool="long", stop_token_ids=[plain[2]]))
    assert list(stopped.token_ids) == plain[:plain.index(plain[2]) + 1] and stopped.finish_reason == "stop"


# Accepted: honoured (the sampling controls), or "off" values of what dynpart does not do, or no effect on the answer
ACCEPTED = [{"presence_penalty": 0.5, "frequency_penalty": -0.5}, {"repetition_penalty": 1.2}, {"min_p": 0.05},
            {"logit_bias": {"11": -100, "12": 2.5}}, {"min_tokens": 1, "stop_token_ids": [0]}, {"top_k": -1},
            {"skip_special_tokens": False, "include_stop_str_in_output": True, "stop": ["zz"]},
            {"n": 1, "best_of": 1}, {"n": 2, "best_of": 3}, {"prompt": ["Hi", "Ho"]}, {"prompt": [[1, 2], [3]]},
            {"logprobs": 0}, {"logprobs": None}, {"echo": False}, {"suffix": None},
            {"logprobs": 3, "echo": True}, {"echo": True, "max_tokens": 0, "logprobs": 1},
            {"user": "u-1", "service_tier": "auto", "metadata": {"k": "v"}, "store": False, "request_id": "r-1"},
            {"priority": 0, "truncate_prompt_tokens": None, "allowed_token_ids": None, "bad_words": []},
            {"response_format": {"type": "text"}}, {"tools": [], "tool_choice": "none", "parallel_tool_calls": False},
            {"stream_options": {"include_usage": True, "continuous_usage_stats": False}, "stream": True},
            {"stream_options": {"include_usage": True, "continuous_usage_stats": True}, "stream": True}]
# Refused, each a 400 naming the field: what would change the answer in a way dynpart cannot honour
REFUSED = [("logprobs", {"logprobs": 21}), ("max_tokens", {"max_tokens": 0}), ("n", {"n": 65}),
           ("best_of", {"n": 2, "best_of": 1}), ("bad_words", {"bad_words": ["the"]}), ("priority", {"priority": 1}),
           ("suffix", {"suffix": "}"}), ("response_format", {"response_format": {"type": "json_object"}}),
           ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
           ("tool_choice", {"tool_choice": "required"}), ("guided_json", {"guided_json": {"type": "object"}}),
           ("presence_penalty", {"presence_penalty": 2.5}), ("repetition_penalty", {"repetition_penalty": 0}),
           ("min_p", {"min_p": 1.5}), ("min_tokens", {"min_tokens": 5, "max_tokens": 2}),
           ("logit_bias", {"logit_bias": {"49152": 1}}), ("stop_token_ids", {"stop_token_ids": [10**6]}),
           ("top_k", {"top_k": -2}), ("frobnicate", {"frobnicate": 1})]


@pytest.mark.parametrize("fields", ACCEPTED, ids=lambda f: ",".join(f))
def test_fields_other_servers_accept_are_accepted(http, fields):
    # several choices start at once: `fast` takes 2 ongoing + 1 queued, so under any other load a 503 there would be
    # the right answer; they go to `long`, which has room
    several = isinstance(fields.get("prompt"), list) or max(fields.get("n") or 1, fields.get("best_of") or 1) > 1
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields},
                  headers={"x-dynpart-pool": "long"} if several else {})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("param, fields", REFUSED, ids=[p for p, _ in REFUSED])
def test_fields_dynpart_cannot_honour_are_a_400_naming_them(http, param, fields):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split(".")[-1] in error["message"], error


@pytest.mark.parametrize("fields, param", [({"logprobs": False, "top_logprobs": None}, None),
                                           ({"logprobs": True, "top_logprobs": 2}, None),
                                           ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                           ({"top_logprobs": 2}, "top_logprobs")])
def test_chat_logprobs_are_served_and_bad_values_refused(http, fields, param):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 2, **fields})
    assert r.status_code == (400 if param else 200), r.text
    if param:
        assert r.json()["error"]["param"] == param
