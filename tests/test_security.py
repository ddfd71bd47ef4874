"""Security defaults: local listening, the optional API key (HTTP and gRPC), a per-request timeout, and no
client input ever unpickled or evaluated.

Against the session's ``keyed_app`` (conftest: an API key and a 1 s request timeout, 1 device, the tiny chat model;
test_openapi uses it too).
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import KEY, KEYED_APP, SHARED_MODEL, grpc_stub, http_client

from app.serve.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = SHARED_MODEL
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def http(keyed_app):
    with http_client(keyed_app.ports, keyed_app.route, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(keyed_app):
    with grpc_stub(keyed_app.ports) as s:  # names its app itself: the key check is what is tested
        yield s


BODY = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                                     {"authorization": f"Basic {KEY}"}])
def test_without_the_key_it_is_401(http, headers):
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        r = http.request(method, path, json=BODY, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_with_the_key_it_serves_and_health_needs_none(http):
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/completions", json=BODY, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text


def test_grpc_needs_the_key_in_metadata(stub):
    from app.serve.protos import dynpart_pb2 as pb

    req = pb.GenerateRequest(prompt="Hi", max_tokens=4)
    for meta in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, metadata=(("application", KEYED_APP), *meta))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = stub.Generate(req, metadata=(("application", KEYED_APP), ("authorization", f"Bearer {KEY}")))
    assert reply.completion_tokens == 4


def test_a_request_past_the_timeout_is_504_and_its_blocks_are_freed(http):
    from ray import serve

    t0 = time.monotonic()
    r = http.post("/v1/completions", headers=AUTH, json={**BODY, "max_tokens": 900, "ignore_eos": True})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "timeout_error" and "request_timeout_s of 1 s" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5

    def info():
        return serve.get_deployment_handle("one", KEYED_APP).info.remote().result(timeout_s=30)

    deadline = time.monotonic() + 10
    while info()["seqs_in_use"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info()["seqs_in_use"] == 0  # the generation was cancelled, not left running


def test_api_key_comes_from_config_or_environment(monkeypatch):
    monkeypatch.delenv("DYNPART_API_KEY", raising=False)
    assert AppConfig(pools=[{"name": "a"}]).api_key is None
    monkeypatch.setenv("DYNPART_API_KEY", "from-env")
    cfg = AppConfig(pools=[{"name": "a"}])
    assert cfg.api_key.get_secret_value() == "from-env" and "from-env" not in repr(cfg)
    assert AppConfig(pools=[{"name": "a"}], api_key="own").api_key.get_secret_value() == "own"


def test_grpc_refuses_other_machines_unless_configured():
    from app.serve.errors import Forbidden
    from app.serve.guard import check_peer

    for local in ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "ipv6:%5B::ffff:127.0.0.1%5D:5000", "unix:/tmp/s"):
        check_peer(local, remote_allowed=False)
    with pytest.raises(Forbidden):
        check_peer("ipv4:10.1.2.3:5000", remote_allowed=False)
    check_peer("ipv4:10.1.2.3:5000", remote_allowed=True)


def test_shipped_config_and_test_servers_listen_on_localhost():
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert cfg["http_options"]["host"] == "127.0.0.1"
    assert not cfg["applications"][0]["args"].get("grpc_remote_clients", False)
    assert '"host": "127.0.0.1"' in (ROOT / "tests" / "conftest.py").read_text()


def test_no_client_input_is_unpickled_or_evaluated():
    """No module that serves requests calls eval/exec/pickle/yaml.load/marshal (Ray pickles only its own internal
    messages between processes of the cluster, never bytes from a client)."""
    builtins = {"eval", "exec", "compile", "__import__"}
    unsafe_modules = {"pickle", "cloudpickle", "dill", "marshal", "yaml", "torch", "shelve"}
    paths = sorted((ROOT / "app").rglob("*.py"))
    assert len(paths) > 30, "no serving module read"
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cloudpickle", "dill", "marshal", "shelve"} & set(names), path.name
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id in builtins:
                raise AssertionError(f"{path.name}:{node.lineno} calls {f.id}")
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in unsafe_modules
                    and f.attr in ("load", "loads", "unsafe_load", "Unpickler")):
                raise AssertionError(f"{path.name}:{node.lineno} calls {f.value.id}.{f.attr}")
