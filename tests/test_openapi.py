"""The API says what it answers: the app's own ``/openapi.json``, fetched as a schema-driven client would, documents
every status the completion routes really answer, each error with OpenAI's error body as its schema; an error about
a missing field names the field.

The session's ``keyed_app`` (conftest: the tiny chat model on 1 device, shared with test_security) has an API key, a
16 KiB body limit and a 1 s request timeout, so that every error can be provoked for real: each answer's status,
content type, headers and body are checked against what the schema documents for that route and status.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import pytest
from conftest import KEY, MAX_BODY, SHARED_MODEL, http_client

MODEL = SHARED_MODEL
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "content-type": "application/json"}
ROUTES = ("/v1/completions", "/v1/chat/completions")
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def http(keyed_app):
    """A client on the session's ``keyed_app`` (conftest: an API key, a 1 s request timeout, a 16 KiB body limit, a
    pool that takes 2 requests and queues 1), whose every answer the schema must document."""
    with http_client(keyed_app.ports, keyed_app.route, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def schema(http) -> dict:
    r = http.get("/openapi.json", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def body(path: str, text: str = "Hi", **fields) -> dict:
    if path.endswith("/chat/completions"):
        return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2, **fields}
    return {"model": MODEL, "prompt": text, "max_tokens": 2, **fields}


def provoke(http: httpx.Client, path: str) -> dict[str, tuple[int, httpx.Response]]:
    """Each case's expected status and the app's real answer."""
    ok = body(path, temperature=0)
    long = body(path, "hello " * 1100) if path == "/v1/completions" else \
        {**ok, "messages": [{"role": "user", "content": "hello " * 170}] * 10}  # a message holds 1024 characters
    post = lambda **kw: http.post(path, **{"headers": JSON, **kw})  # noqa: E731
    served = post(json=ok)
    for _ in range(60):  # the previous case's burst and timed-out request may still hold the replica: wait it out
        if served.status_code != 503:
            break
        time.sleep(1)
        served = post(json=ok)
    return {
        "served": (200, served),
        "streamed": (200, post(json={**ok, "stream": True})),
        "empty body": (400, post(content=b"")),
        "malformed JSON": (400, post(content=b'{"model": "tiny-chat", ')),
        "wrong content type": (415, post(content=json.dumps(ok), headers={**AUTH, "content-type": "text/plain"})),
        "over-long prompt": (400, post(json=long)),
        "bad parameter": (400, post(json={**ok, "temperature": 5})),
        "body too large": (413, post(json=body(path, "a" * MAX_BODY))),
        "no API key": (401, post(json=ok, headers={})),
        "another model": (404, post(json={**ok, "model": "gpt-4"})),
        "past the timeout": (504, post(json={**ok, "max_tokens": 900, "ignore_eos": True})),
    }


def overload(http: httpx.Client, path: str) -> list[httpx.Response]:
    """8 requests at once on a replica that admits 2 running + 1 queued."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=60) as c:
            req = body(path, max_tokens=48, temperature=0, ignore_eos=True)
            return await asyncio.gather(*(c.post(path, json=req, headers=AUTH) for _ in range(8)))

    return asyncio.run(burst())


def assert_documented(schema: dict, path: str, r: httpx.Response, why: str) -> None:
    """The answer's status is documented for the route, with its content type and headers, and the body fits the
    documented schema; an error's schema is OpenAI's error body."""
    documented = schema["paths"][path]["post"]["responses"]
    status = str(r.status_code)
    assert status in documented, f"{path}: {why} answered {status}, documented only {sorted(documented)}"
    answer = documented[status]
    media = r.headers["content-type"].split(";")[0].strip()
    assert media in answer.get("content", {}), f"{path} {status} ({why}): {media} is not documented"
    for header in answer.get("headers", {}):
        assert header in r.headers, f"{path} {status} ({why}): documented header {header} missing"
    if r.status_code >= 400:
        assert answer["content"][media]["schema"] == ERROR_SCHEMA, (path, status, answer)
    if media == "application/json":
        jsonschema.validate(r.json(), {**answer["content"][media]["schema"], "components": schema["components"]})


def test_the_error_schema_is_openais_error_body(schema):
    schemas = schema["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    detail = schemas["ErrorDetail"]
    assert set(detail["required"]) == set(detail["properties"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", ROUTES)
def test_every_status_a_completion_route_answers_is_documented(http, schema, path):
    answers = provoke(http, path)
    for why, (expected, r) in answers.items():
        assert r.status_code == expected, f"{why}: {r.status_code} {r.text[:300]}"
        assert_documented(schema, path, r, why)
    assert answers["streamed"][1].text.rstrip().endswith("data: [DONE]")
    burst = overload(http, path)
    assert 503 in [r.status_code for r in burst], [r.status_code for r in burst]
    for r in burst:
        assert_documented(schema, path, r, "overload")
    # nothing documented that the app never answers: FastAPI's own 422 is not one (validation errors are 400)
    assert "422" not in schema["paths"][path]["post"]["responses"]


@pytest.mark.parametrize("path, content, headers, param, says", [
    ("/v1/completions", {"prompt": "x"}, JSON, "model", "missing required field 'model'"),
    ("/v1/completions", {}, JSON, "model", "missing required fields 'model', 'prompt'"),
    ("/v1/chat/completions", {"model": MODEL}, JSON, "messages", "missing required field 'messages'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, JSON, "messages.0.content",
     "missing required field 'messages.0.content'"),
    ("/v1/completions", b"", JSON, "model", "the request body is empty: send a JSON object with 'model', 'prompt'"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x"}).encode(), AUTH, "content-type",
     "content-type: application/json"),
])
def test_a_missing_field_is_named(http, path, content, headers, param, says):
    kw = {"json": content} if isinstance(content, dict) else {"content": content}
    r = http.post(path, headers=headers, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"]) == (param, "invalid_request_error"), err
    assert says in err["message"], err


def test_only_the_clients_mistakes_are_4xx():
    """A bare ``ValueError`` (any exception) from the server's own code, here or inside a replica, is a 500
    ``server_error``, not a 400 blaming the client; the client's mistakes (``RequestError``, request validation)
    are 400 naming their field, also after crossing from a replica (Ray pickles the exception)."""
    import pickle

    import grpc
    from pydantic import ValidationError
    from ray.exceptions import RayTaskError

    from app.engine.messages import RequestError
    from app.engine.params import SamplingParams
    from app.serve.errors import api_error

    for bug in (ValueError("math domain error"), RayTaskError("generate", "traceback", ValueError("bad shape"))):
        err = api_error(bug)
        assert (err.status, err.kind, err.grpc_code) == (500, "server_error", grpc.StatusCode.INTERNAL), err
        assert err.message.startswith("internal error: ValueError")
    mistake = pickle.loads(pickle.dumps(RequestError("max_tokens (9000) exceeds this server's limit", "max_tokens")))
    for e in (mistake, RayTaskError("generate", "traceback", mistake)):
        err = api_error(e)
        assert (err.status, err.kind, err.param) == (400, "invalid_request_error", "max_tokens"), err
    with pytest.raises(ValidationError) as invalid:
        SamplingParams(temperature=5)
    assert (api_error(invalid.value).status, api_error(invalid.value).param) == (400, "temperature")
