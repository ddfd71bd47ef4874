"""Failing politely: bad input, overload, disconnects, fuzzing, a soak and killed shard workers.

One app for the module, deployed under its own name and route on the session's Serve: the tiny chat model on one
pool of 2 CPU devices (gloo), 2 sequences at once (max_num_seqs), 2 requests running + 2 queued per replica, a
1 s health check and a short collective timeout. The tests that kill workers run last (they replace the replica).
RELIABILITY.md reports the figures; ``FUZZ_EXAMPLES`` and ``SOAK_REQUESTS`` set their sizes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import httpx
import pytest
from conftest import deployed, grpc_stub, http_client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from load_tests.chaos import rss_mb
from load_tests.soak import ended, mixed_requests

APP, ROUTE, MODEL, POOL = "reliability", "/rel", "tiny-chat", "p2"
POLICY = "static:weight_gathered"  # the static policy the load tests compare against: every prefill token-sharded
MAX_TOKENS_LIMIT, MAX_BODY = 256, 64 * 1024
FUZZ_EXAMPLES = int(os.environ.get("DYNPART_FUZZ_EXAMPLES", 200))
SOAK_REQUESTS = int(os.environ.get("DYNPART_SOAK_REQUESTS", 90))
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def rel(serve_session, chat_tiny):
    pool = dict(name=POOL, devices=2, max_num_seqs=2, max_model_len=512, max_ongoing_requests=2, max_queued_requests=2,
                health_check_period_s=1, collective_timeout_s=10)
    args = {"model": chat_tiny, "served_model_name": MODEL, "pools": [pool], "graceful_shutdown_s": 1,
            "max_tokens_limit": MAX_TOKENS_LIMIT, "max_body_bytes": MAX_BODY, "request_timeout_s": 120,
            "policy": POLICY}
    with deployed(serve_session, args, APP, ROUTE) as ports:
        yield ports


@pytest.fixture(scope="module")
def http(rel):
    with http_client(rel, ROUTE) as client:
        yield client


@pytest.fixture(scope="module")
def stub(rel):
    with grpc_stub(rel) as s:
        yield s


META = (("application", APP),)


def replica_info() -> dict:
    from ray import serve

    return serve.get_deployment_handle(POOL, APP).info.remote().result(timeout_s=30)


def wait_until(predicate, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def idle() -> bool:
    info = replica_info()
    return info["seqs_in_use"] == 0 and info["running"] == 0 and info["queued_tokens"] == 0


def assert_openai_error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), r.text
    return err


def test_a_static_policy_prefills_every_request_its_way(http, chat_tiny):
    """Under ``static:weight_gathered`` a prompt the planner would prefill another way still runs weight_gathered,
    and a request that names a strategy the replica built at start gets the one it names (any other is a 400)."""
    from cost import get_hardware, plan_prefill
    from strategies.loader import Checkpoint

    ckpt = Checkpoint(chat_tiny)
    for prompt in ("Hi", "Tell me everything about partitioned matrices " * 8):
        n = len(ckpt.tokenizer()(prompt)["input_ids"])
        assert plan_prefill(ckpt.shape, get_hardware("cpu"), 2, n).strategy != "weight_gathered"  # dynamic's pick
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2, **GREEDY})
        assert r.status_code == 200 and r.headers["x-dynpart-strategy"] == "weight_gathered", r.text
        assert r.json()["usage"]["dynpart"]["strategy"] == "weight_gathered"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **GREEDY},
                  headers={"x-dynpart-strategy": "megatron"})
    assert r.status_code == 200 and r.headers["x-dynpart-strategy"] == "megatron"
    label = next(s for s in replica_info()["available"] if "=" in s)  # a layout the replica built, by label
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi there", "max_tokens": 2, **GREEDY},
                  headers={"x-dynpart-strategy": label})
    assert r.status_code == 200 and r.headers["x-dynpart-strategy"] == label, r.text
    # a valid label the replica did not build at start: refused (a serving step never builds one)
    unbuilt = "residual=TOK qkv=col attn=heads o=replicated gate_up=gathered down=replicated"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **GREEDY},
                  headers={"x-dynpart-strategy": unbuilt})
    assert r.status_code == 400 and "did not build it at start" in assert_openai_error(r)["message"], r.text
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **GREEDY},
                  headers={"x-dynpart-strategy": unbuilt.replace("o=replicated", "o=sideways")})
    assert r.status_code == 400 and "layout field 'o'" in assert_openai_error(r)["message"]


# -- validation -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, says", [
    ({"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, f"limit of {MAX_TOKENS_LIMIT}"),
    ({"prompt": "x", "max_tokens": 10**40}, 400, f"exceeds this server's limit of {MAX_TOKENS_LIMIT}"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature: Input should be greater than or equal to 0"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p: Input should be greater than 0"),
    ({"prompt": "x", "top_k": 1001}, 400, "top_k: Input should be less than or equal to 1000"),
    ({"prompt": "x", "n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed"),
    ({"prompt": "x", "stop": ["a"] * 5}, 400, "stop: List should have at most 4 items"),
    ({"prompt": "x", "stop": "y" * 65}, 400, "stop: String should have at most 64 characters"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty: Input should be less than or equal to 2"),
    ({"prompt": "x", "stream_options": {"include_usage": "maybe"}}, 400, "stream_options.include_usage"),
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": []}, 400, "prompt is empty"),
    ({"prompt": [1, -3]}, 400, "prompt"),
    ({"prompt": [1, 49152]}, 400, "vocabulary"),
    ({"prompt": "hello " * 500, "max_tokens": 16}, 400, "context limit"),
    ({"prompt": None}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    ({"prompt": "x", "model": 7}, 400, "model"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus: Extra inputs are not permitted"),
])
def test_every_field_is_checked_and_the_error_names_it(http, body, status, says):
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    assert says in assert_openai_error(r)["message"]


@pytest.mark.parametrize("body, says", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "image_url"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs needs logprobs"),
])
def test_chat_fields_are_checked(http, body, says):
    r = http.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert says in assert_openai_error(r)["message"]


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("content, headers, status, says", [
    (b'{"model": "tiny-chat", "prompt": ', JSON, 400, "not valid JSON"),
    (b'{"model": "tiny-chat", "prompt": "\xff\xfe"}', JSON, 400, "UTF-8"),
    (b'{"model": "tiny-chat", "prompt": "hi", "temperature": NaN}', JSON, 400, "temperature"),
    (b'{"model": "tiny-chat", "prompt": "hi", "top_p": 1e999}', JSON, 400, "top_p"),
    (b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", JSON, 400, "parsed"),
    (b"[1, 2, 3]", JSON, 400, "dictionary"),
    (b"[" * 20000 + b"]" * 20000, JSON, 400, "parsed"),
    (b"", JSON, 400, "body is empty"),
    (b"model=tiny-chat&prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, "content-type"),
    (b'{"model": "tiny-chat", "prompt": "hi"}', {"content-type": "text/plain"}, 415, "application/json"),
    (b'{"model": "tiny-chat", "prompt": "' + b"a" * MAX_BODY + b'"}', JSON, 413, f"{MAX_BODY} bytes"),
])
def test_malformed_bodies_are_4xx(http, content, headers, status, says):
    r = http.post("/v1/completions", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert says in assert_openai_error(r)["message"]


def test_a_chunked_body_past_the_limit_is_413(http):
    def chunks():
        yield b'{"model": "tiny-chat", "prompt": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"a" * 1024
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers=JSON)  # a generator: no content-length
    assert r.status_code == 413, r.text


def test_unknown_routes_and_methods_answer_openai_errors(http):
    assert_openai_error(r := http.get("/v1/nothing-here"))
    assert r.status_code == 404
    assert_openai_error(r := http.get("/v1/completions"))
    assert r.status_code == 405


@pytest.mark.parametrize("fields, code, says", [
    (dict(prompt="x", max_tokens=MAX_TOKENS_LIMIT + 1), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    (dict(prompt="x", temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="x", top_k=5000), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (dict(prompt="x", stop=["a"] * 5), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (dict(prompt="x", strategy="fastest"), grpc.StatusCode.INVALID_ARGUMENT, "strategy"),
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt or messages"),
    (dict(prompt="x" * (MAX_BODY + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes"),  # as HTTP's 413
    (dict(prompt="x", model="gpt-4"), grpc.StatusCode.NOT_FOUND, "gpt-4"),
])
def test_bad_grpc_requests(stub, fields, code, says):
    from app.serve.protos import dynpart_pb2 as pb

    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(**fields), metadata=META, timeout=60)
    assert e.value.code() == code and says in e.value.details(), e.value.details()


def test_bad_grpc_chat_role(stub):
    from app.serve.protos import dynpart_pb2 as pb

    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")]), metadata=META)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in e.value.details()


# -- overload and disconnects -----------------------------------------------------------------------------------------

def test_overload_is_503_with_retry_after_and_resource_exhausted(rel, stub):
    """2 running + 2 queued per replica: of 10 long requests at once, some are refused at once, the rest finish."""
    from app.serve.protos import dynpart_pb2 as pb

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rel['http']}{ROUTE}", timeout=120) as c:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 48, **GREEDY}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(10)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and assert_openai_error(r)["type"] == "overloaded_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 48

    calls = [stub.Generate.future(pb.GenerateRequest(prompt="Hi", max_tokens=48, ignore_eos=True), metadata=META)
             for _ in range(10)]
    outcomes = []
    for call in calls:
        try:
            outcomes.append(len(call.result(timeout=120).token_ids))
        except grpc.RpcError as e:
            outcomes.append(e.code())
    assert 48 in outcomes and grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes, outcomes
    assert set(outcomes) <= {48, grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
    assert wait_until(idle, 30)


def stopped_early(leave, tokens: int = MAX_TOKENS_LIMIT) -> None:
    """``leave()`` starts a ``tokens``-token generation and leaves as a client would once it runs; the generation
    must stop then, not run to its end: the replica is idle well before the remaining steps could have run."""
    assert wait_until(idle, 30)
    leave()
    t0 = time.monotonic()
    assert wait_until(idle, 30, every=0.02), replica_info()
    stopped_s, step_s = time.monotonic() - t0, replica_info()["load"]["step_s"]
    print(f"left: idle after {stopped_s:.2f} s; the rest would take {tokens * step_s:.2f} s")
    assert stopped_s < tokens * step_s / 4, (stopped_s, step_s)  # cancelled, not finished


def test_a_client_that_leaves_a_stream_stops_its_generation(rel):
    """A client leaving mid-stream stops its generation at once, and leaves nothing held (the stream's generator is
    closed explicitly, not left to the garbage collector)."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS_LIMIT, "stream": True, **GREEDY}

    def leave() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{rel['http']}{ROUTE}", timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
                assert replica_info()["seqs_in_use"] == 1  # generating (256 tokens take seconds)
            # leaving the block closes the connection mid-stream

    stopped_early(leave)


def test_a_client_that_leaves_a_whole_answer_stops_its_generation(rel):
    """The same for a non-streamed request: the client gives up (its timeout) while the answer is generated."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS_LIMIT, **GREEDY}

    def leave() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{rel['http']}{ROUTE}") as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))

    stopped_early(leave)


def test_a_grpc_call_cancelled_by_its_client_stops_its_generation(stub):
    from app.serve.protos import dynpart_pb2 as pb

    def leave() -> None:
        call = stub.Generate.future(pb.GenerateRequest(prompt="Once", max_tokens=MAX_TOKENS_LIMIT, ignore_eos=True),
                                    metadata=META)
        assert wait_until(lambda: replica_info()["seqs_in_use"] == 1, 10, every=0.05)
        call.cancel()

    stopped_early(leave)


def test_a_grpc_stream_cancelled_by_its_client_stops_its_generation(stub):
    """KNOWN DEFECT, Ray Serve's (2.60): in ~1 of 10 repeats here the cancel never reaches the ingress, and the engine
    generates every token for nobody. Located in Serve's gRPC proxy: when the client's cancel lands while the proxy is
    writing a message (not awaiting the replica's next one), grpc closes the proxy's generators with GeneratorExit at
    ``yield result`` (``serve/_private/proxy.py`` ``send_request_to_replica``, which logs "Request failed due to
    unexpected error ... GeneratorExit"), its ``except BaseException`` takes it, and the replica call is never
    cancelled: ``ProxyResponseGenerator`` cancels only on a CancelledError inside its own ``__anext__`` (ray PR
    #42665 described this and was closed unmerged). The proxy's log shows one such GeneratorExit per failing repeat.
    So a leave that ran to its end is tried once more: the test still fails when cancelling does not work at all.
    The rate: parametrize it over ``range(30)`` and run ``pytest tests/test_reliability.py -k grpc_stream_cancelled``."""
    from app.serve.protos import dynpart_pb2 as pb

    def leave() -> None:
        stream = stub.GenerateStream(pb.GenerateRequest(prompt="Once", max_tokens=MAX_TOKENS_LIMIT, ignore_eos=True),
                                     metadata=META)
        next(stream)
        next(stream)
        stream.cancel()

    try:
        stopped_early(leave)
    except AssertionError as e:
        print(f"KNOWN DEFECT: a cancelled gRPC stream ran to its end ({e}); trying once more")
        stopped_early(leave)


# -- fuzzing ----------------------------------------------------------------------------------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=40), st.lists(st.integers(-5, 60000), max_size=6),
                 st.dictionaries(st.text(max_size=8), st.integers(), max_size=3))
SMALL = st.one_of(st.integers(-2, 6), st.integers(MAX_TOKENS_LIMIT - 2, 10**12))  # cheap, or past a limit
TEXT = st.text(st.characters(codec="utf-8"), min_size=0, max_size=60)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "robot", ""]),
                                 "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=2))})
FIELDS = {
    "model": st.one_of(st.just(MODEL), st.just(MODEL), TEXT, JUNK),
    "prompt": st.one_of(TEXT, st.lists(st.integers(-3, 50000), max_size=8), JUNK),
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), JUNK),
    "max_tokens": st.one_of(SMALL, JUNK),
    "max_completion_tokens": st.one_of(SMALL, JUNK),
    "temperature": st.one_of(st.floats(-1, 3), JUNK),
    "top_p": st.one_of(st.floats(-0.5, 1.5), JUNK),
    "top_k": st.one_of(st.integers(-2, 2000), JUNK),
    "seed": st.one_of(st.integers(-2**64, 2**65), JUNK),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=6), JUNK),
    "stream": st.one_of(st.booleans(), JUNK),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JUNK),
    "ignore_eos": st.one_of(st.booleans(), JUNK),
    "n": st.one_of(st.integers(0, 3), JUNK),
    "logprobs": JUNK,
    "echo": JUNK,
    "user": st.one_of(TEXT, JUNK),
    "presence_penalty": st.one_of(st.floats(-2, 2), JUNK),
    "bogus": JUNK,
}
# Mostly well-formed bodies too, so the fuzzer also reaches generation (with valid-looking but odd values).
OPTIONS = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 1000),
           "seed": st.integers(0, 2**63 - 1), "stop": st.lists(TEXT, max_size=4), "stream": st.booleans(),
           "ignore_eos": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
COMPLETION = st.fixed_dictionaries({"model": st.just(MODEL), "max_tokens": st.integers(1, 4), "prompt": st.one_of(
    TEXT, st.lists(st.integers(0, 49151), min_size=1, max_size=8))}, optional=OPTIONS)
CHAT = st.fixed_dictionaries({"model": st.just(MODEL), "max_tokens": st.integers(1, 4),
                              "messages": st.lists(MESSAGE, min_size=1, max_size=2)}, optional=OPTIONS)
ANY = st.fixed_dictionaries({}, optional=FIELDS)
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
RAW = st.one_of(st.binary(max_size=200), ANY.map(lambda b: repr(b).encode()))  # bytes, and Python (not JSON) text
# (path, body or raw bytes): arbitrary fields anywhere, raw bytes anywhere, and well-formed bodies with odd values.
CASES = st.one_of(st.tuples(PATHS, ANY), st.tuples(PATHS, RAW), st.tuples(st.just("/v1/completions"), COMPLETION),
                  st.tuples(st.just("/v1/chat/completions"), CHAT))


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(rel, http):
    import json

    seen: dict[int, int] = {}

    def post(path: str, **kw) -> None:
        r = http.post(path, **kw)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (kw, r.text)
        if r.status_code >= 400:
            assert_openai_error(r)
        elif "text/event-stream" in r.headers.get("content-type", ""):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=CASES, content_type=st.sampled_from(["application/json"] * 4 + ["application/json; charset=utf-8",
                                                                               "text/plain"]))
    def fuzz(case, content_type):
        path, body = case
        content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
        post(path, content=content, headers={"content-type": content_type})

    fuzz()
    print(f"fuzz: {FUZZ_EXAMPLES} examples, statuses {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) > 0 and sum(v for k, v in seen.items() if 400 <= k < 500) > 0, seen
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "still fine?", "max_tokens": 4, **GREEDY})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert wait_until(idle, 30)


# -- soak -------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_soak_accounts_for_every_request_and_leaks_nothing(rel, http):
    """Mixed short requests (some streamed, some cancelled by their client, some invalid) 8 at a time, twice the
    replica's 2 running + 2 queued: every one ends 200, cancelled, 400 (invalid on purpose) or 503 with retry-after
    (retried as it says); afterwards no KV block is held and the replica's memory has not grown."""
    base = f"http://127.0.0.1:{rel['http']}{ROUTE}"
    asyncio.run(mixed_requests(base, 40, 8, MODEL, seed=1))  # warm up every path before the baseline
    assert wait_until(idle, 30)
    pids = replica_info()["pids"]
    before = rss_mb(pids)
    t0 = time.monotonic()
    outcomes = asyncio.run(mixed_requests(base, SOAK_REQUESTS, 8, MODEL, seed=2))
    elapsed = time.monotonic() - t0
    assert ended(outcomes) == SOAK_REQUESTS and not [k for k in outcomes if k.startswith("unexpected")], outcomes
    assert outcomes["503 (retried)"] > 0 and outcomes["cancelled"] > 0, outcomes  # past the queue limit; cancels
    assert wait_until(idle, 30), replica_info()
    after = rss_mb(pids)
    print(f"soak: {SOAK_REQUESTS} requests in {elapsed:.1f} s at concurrency 8: {dict(outcomes)}; "
          f"RSS of replica + workers {before:.0f} -> {after:.0f} MB")
    assert outcomes["200"] + outcomes["200-stream"] > SOAK_REQUESTS // 2, outcomes
    assert after < before * 1.10 + 50, (before, after)
    assert replica_info()["pids"] == pids  # nothing crashed and restarted on the way


# -- faults (last: they replace the replica) ----------------------------------------------------------------------------

def recovered(http: httpx.Client, old_pids: list[int]):
    """A request succeeds on a replica whose processes are all new."""
    try:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 4, **GREEDY},
                      timeout=30)
    except httpx.HTTPError:
        return False
    if r.status_code != 200:
        return False
    info = replica_info()
    return info if not set(info["pids"]) & set(old_pids) else False


@pytest.mark.slow
def test_a_killed_shard_worker_fails_its_requests_fast_and_the_replica_is_replaced(rel, http, stub):
    """SIGKILL rank 1 (a shard worker) of the pool's only replica under a gRPC call: UNAVAILABLE at once (rank 0, the
    replica itself, stuck in a collective with it, is not waited for; nowhere to retry it); new
    requests get 503 with retry-after until Serve (health check) replaces the replica, whose new workers serve.
    (Faults under load, with a second replica to retry on: tests/test_chaos.py.)"""
    from app.serve.protos import dynpart_pb2 as pb

    pids = replica_info()["pids"]
    call = stub.Generate.future(pb.GenerateRequest(prompt="Once", max_tokens=MAX_TOKENS_LIMIT, ignore_eos=True),
                                metadata=META)
    assert wait_until(lambda: replica_info()["seqs_in_use"] == 1, 10, every=0.05)
    t0 = time.monotonic()
    os.kill(pids[-1], signal.SIGKILL)  # rank 1
    with pytest.raises(grpc.RpcError) as e:
        call.result(timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    failed_after = time.monotonic() - t0
    assert failed_after < 10
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "now?", "max_tokens": 4})
    assert r.status_code == 503 and r.headers["retry-after"], r.text  # the broken replica takes nothing, explicitly
    t1 = time.monotonic()
    info = wait_until(lambda: recovered(http, pids), 120, every=1)
    assert info, "the replica was not replaced"
    print(f"fault: gRPC call failed UNAVAILABLE {failed_after:.2f} s after the kill; replaced and serving after "
          f"{time.monotonic() - t1:.1f} s")
    assert wait_until(idle, 30)
