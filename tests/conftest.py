"""Shared fixtures: tiny random Llama checkpoints, the real default model, transformers references, one Ray session.

Ray is started once per test session (per-test starts cost minutes on 2 cores).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The planner prices ``cpu`` by a calibration profile when one exists: tests get an empty profile directory of their
# own (set before Ray starts, so every replica and worker sees it), whatever the machine's ~/.cache holds.
os.environ["DYNPART_PROFILE_DIR"] = tempfile.mkdtemp(prefix="dynpart-test-profiles-")
atexit.register(shutil.rmtree, os.environ["DYNPART_PROFILE_DIR"], ignore_errors=True)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import contextlib  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny shapes chosen to exercise every sharding path: MHA, GQA, MQA, heads that are not powers of two, heads and MLP
# sizes that need zero padding for some p, KV heads replicated when p > KV heads, tied and untied embeddings.
TINY_SHAPES: dict[str, dict] = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                tie_word_embeddings=False),
    "gqa": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=150,
                tie_word_embeddings=True),
    "odd": dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, intermediate_size=100,
                tie_word_embeddings=False, head_dim=8),
    "mqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
                tie_word_embeddings=True),
}


def tiny_config(name: str, vocab_size: int = 512, layers: int = 2, **extra):
    from transformers import LlamaConfig

    fields = dict(vocab_size=vocab_size, num_hidden_layers=layers, max_position_embeddings=512, rms_norm_eps=1e-5)
    return LlamaConfig(**{**fields, **TINY_SHAPES[name], **extra})


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Checkpoint folders of every tiny shape (random weights, seed fixed)."""
    from strategies.loader import save_random_llama

    root = tmp_path_factory.mktemp("tiny")
    return {name: str(save_random_llama(tiny_config(name), root / name, seed=i))
            for i, name in enumerate(TINY_SHAPES)}


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The embedded default model, converted once into the cache (make test does this before pytest)."""
    from strategies.loader import Checkpoint

    return str(Checkpoint("smollm2-135m").path)


@pytest.fixture(scope="session")
def chat_tiny(tmp_path_factory, smollm2) -> str:
    """A tiny random model that carries the default model's tokenizer, for text-level tests."""
    from strategies.loader import save_random_llama

    cfg = tiny_config("gqa", vocab_size=49152, max_position_embeddings=1024)
    return str(save_random_llama(cfg, tmp_path_factory.mktemp("chat") / "tiny-chat", tokenizer_from=smollm2))


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_logits(path: str, prompt: list[int]) -> torch.Tensor:
    """transformers' float32 logits for every prompt token [T, V]."""
    with torch.no_grad():
        return hf_model(path)(torch.tensor([prompt])).logits[0]


def reference_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (EOS ignored, so exactly n tokens)."""
    model = hf_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def local_engine(path: str, tokenizer=None, eos: list[int] | None = None, max_num_seqs: int = 4,
                 max_model_len: int = 256, num_blocks: int | None = None, block_size: int = 16,
                 dtype: str = "float32", **engine_kwargs):
    """An engine on one in-process device in ``dtype``; KV blocks for ``max_num_seqs`` sequences of
    ``max_model_len`` unless ``num_blocks`` says otherwise."""
    from app.engine.llm_engine import LLMEngine
    from placement.workers import LocalGroup
    from strategies.loader import Checkpoint

    num_blocks = num_blocks or max_num_seqs * -(-max_model_len // block_size)
    group = LocalGroup(model=path, block_size=block_size, num_blocks=num_blocks, dtype=dtype)
    eos = Checkpoint(path).eos_token_ids() if eos is None else eos
    return LLMEngine(group, tokenizer, eos, num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
                     max_num_seqs=max_num_seqs, **engine_kwargs)


def prompts_for(vocab: int, lengths=(7, 19, 3), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole session: 12 emulated devices and 12 logical CPUs (a Serve test app holds up
    to 7 devices, a module's ``worker_groups`` up to 9; they all share this machine's real cores). Its replicas claim
    cores in a folder of the session's own (placement/cores.py; its workers inherit the variable), not beside a
    ``dynpart serve`` running on the same machine."""
    import ray

    from placement.cores import CLAIMS_DIR_ENV
    from placement.bundles import DEVICE_RESOURCE
    from placement.workers import local_ray_options

    os.environ[CLAIMS_DIR_ENV] = str(tmp_path_factory.mktemp("core-claims"))
    if not ray.is_initialized():
        # metrics exported every 2 s, not 10 s: tests that read /metrics wait for an export
        ray.init(**local_ray_options(num_cpus=12, resources={DEVICE_RESOURCE: 12},
                                     _system_config={"metrics_report_interval_ms": 2000}))
    yield ray
    ray.shutdown()


class WorkerGroups:
    """The shard-worker groups the tests share, one per device count, each reloaded with a fresh runner for every
    test that asks (``Group.load``: the workers and their process group stay). Starting p workers costs ~4 s each on
    2 cores, most of it importing torch; a test that breaks its workers (kills, hangs) starts its own group."""

    def __init__(self) -> None:
        self.groups: dict[int, Any] = {}

    def get(self, devices: int, settings: dict):
        from placement.workers import start_group

        if devices == 1:
            return start_group(1, settings)  # in this process: nothing to keep
        group = self.groups.get(devices)
        if group is None:
            group = self.groups[devices] = start_group(devices, settings)
        else:
            group.load(settings)
        return group

    def shutdown(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        self.groups.clear()


@pytest.fixture(scope="session")
def worker_groups(ray_session):
    """The modules that use shard-worker groups share them (test_dtypes, test_kv_memory, test_layouts,
    test_partitioned: run one after another), so each device count's workers start once; they are shut down after
    the last test that uses them."""
    groups = WorkerGroups()
    stack = contextlib.ExitStack()
    stack.callback(groups.shutdown)
    _live_shared["worker_groups"] = stack
    yield groups
    groups.shutdown()


@pytest.fixture(scope="session")
def serve_session(ray_session) -> dict[str, int]:
    """Serve started once on the session's Ray: HTTP and gRPC proxies on free ports (>= 20000, never 8000/9000)."""
    from ray import serve

    from placement.workers import free_port

    ports = {"http": free_port(), "grpc": free_port()}
    servicer = "app.serve.protos.dynpart_pb2_grpc.add_DynpartServicer_to_server"
    serve.start(http_options={"host": "127.0.0.1", "port": ports["http"]},
                grpc_options={"port": ports["grpc"], "grpc_servicer_functions": [servicer]})
    yield ports
    serve.shutdown()


def float32_pools(args: dict) -> dict:
    """``args`` with every pool that names no dtype in float32: the tests compare with transformers in float32, and
    ``dtype: auto`` (the default) would run bfloat16 on a CPU with AMX or AVX512-BF16."""
    return {**args, "pools": [{"dtype": "float32", **pool} for pool in args["pools"]]}


@contextlib.contextmanager
def deployed(ports: dict[str, int], args: dict, name: str, route: str = "/"):
    """The Serve application built from ``args`` (serve_config.yaml's keys; pools in float32 unless they say), on the
    session's Serve, then deleted."""
    from app.serve.app import build_app

    run_app(build_app(float32_pools(args)), name, route)
    try:
        yield ports
    finally:
        delete_app(name)


def run_app(app, name: str, route: str, timeout_s: float = 120) -> None:
    """``serve.run(app, name=name, route_prefix=route)``, looking every 0.1 s whether it runs (``serve.run`` looks
    once a second)."""
    from ray.serve.api import RunTarget, run_many

    from app.serve.serve_status import app_states

    run_many([RunTarget(target=app, name=name, route_prefix=route)], wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    while (state := app_states().get(name)) is None or state.status != "RUNNING":
        assert state is None or state.status != "DEPLOY_FAILED", state.message
        assert time.monotonic() < deadline, f"app {name} not running {timeout_s:g} s after its deploy: {state}"
        time.sleep(0.1)


def delete_app(name: str, timeout_s: float = 60) -> None:
    """``serve.delete(name)``, looking every 0.1 s whether it is gone (``serve.delete`` looks once a second)."""
    from ray import serve

    from app.serve.serve_status import app_states

    serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while name in app_states():
        assert time.monotonic() < deadline, f"app {name} still there {timeout_s:g} s after its deletion"
        time.sleep(0.1)


@functools.lru_cache(maxsize=1)
def _metrics_client():
    """One client for every scrape (tests poll the page; each new client builds an SSL context, ~25 ms of CPU)."""
    import httpx

    return httpx.Client(timeout=10)


def metric_samples(ray_session, prefix: str = "ray_dynpart_") -> list:
    """Every sample named ``prefix...`` on Ray's metrics endpoint, scraped as Prometheus would. The page holds every
    series of the session's Ray and Serve (megabytes by the suite's end: ~0.5 s of CPU to parse each 1 MB here),
    so only the lines of ``prefix``'s families are parsed."""
    from prometheus_client.parser import text_string_to_metric_families

    port = ray_session.nodes()[0]["MetricsExportPort"]
    text = _metrics_client().get(f"http://127.0.0.1:{port}/metrics").text
    ours = (prefix, f"# HELP {prefix}", f"# TYPE {prefix}")
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(ours))
    return [s for family in text_string_to_metric_families(wanted) for s in family.samples
            if s.name.startswith(prefix)]


@contextlib.contextmanager
def http_client(ports: dict[str, int], route: str = "", timeout: float = 120):
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{ports['http']}{route.rstrip('/')}", timeout=timeout) as client:
        yield client


class _NamesTheApp(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``application`` metadata to every call: with several apps on the session's Serve, its gRPC proxy routes a
    call only by that name."""

    def __init__(self, application: str):
        self.metadata = (("application", application),)

    def _with_app(self, details):
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_app(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_app(details), request)


@contextlib.contextmanager
def grpc_stub(ports: dict[str, int], application: str | None = None):
    """A stub on the session's gRPC proxy; ``application`` names the app every call goes to."""
    from app.serve.protos import dynpart_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
    if application is not None:
        channel = grpc.intercept_channel(channel, _NamesTheApp(application))
    try:
        yield dynpart_pb2_grpc.DynpartStub(channel)
    finally:
        channel.close()


# -- apps several modules share (a deploy costs 15-30 s here) -------------------------------------------------------
# An idle app still costs ~0.25 of a core here (its board, ingress and replicas keep their beat), so a shared app lives
# only while its users run: the modules that use it are run one after another, and it is deleted after the last test
# that uses it (``pytest_runtest_teardown``).

SHARED_MODEL = "tiny-chat"  # the name the shared apps serve the tiny chat model under
KEYED_APP, KEY, MAX_BODY = "keyed", "s3cret-key", 16 * 1024  # the keyed app's name, API key and body limit
_live_shared: dict[str, contextlib.ExitStack] = {}  # shared fixture name -> what deletes its app or stops its workers
_last_user: dict[str, str] = {}  # shared fixture name -> node id of the last test that uses it


def _shared_app(fixture: str, ports: dict[str, int], args: dict, name: str, route: str) -> types.SimpleNamespace:
    if fixture not in _live_shared:
        stack = contextlib.ExitStack()
        stack.enter_context(deployed(ports, args, name, route))
        _live_shared[fixture] = stack
    return types.SimpleNamespace(ports=ports, name=name, route=route)


@pytest.fixture(scope="module")
def pair_app(serve_session, chat_tiny):
    """Pools ``one`` (aggregated) and ``split`` (disaggregated: prefill and decode replicas), one device each: what a
    request returns must not depend on the path it takes (test_choices, test_logprobs)."""
    pools = [dict(name="one", hardware="cpu", devices=1, max_model_len=512, max_num_seqs=8),
             dict(name="split", hardware="cpu", devices=1, max_model_len=512, max_num_seqs=8, disaggregated=True)]
    args = {"model": chat_tiny, "served_model_name": SHARED_MODEL, "pools": pools, "graceful_shutdown_s": 1}
    return _shared_app("pair_app", serve_session, args, "pair", "/pair")


@pytest.fixture(scope="module")
def keyed_app(serve_session, chat_tiny):
    """One small pool behind an API key, a 1 s request timeout and a 16 KiB body limit; at most 2 requests running
    and 1 queued, so a burst is refused (test_security, test_openapi)."""
    pool = dict(name="one", devices=1, max_num_seqs=2, max_model_len=1024, max_ongoing_requests=2,
                max_queued_requests=1, health_check_period_s=1)
    args = {"model": chat_tiny, "served_model_name": SHARED_MODEL, "pools": [pool], "graceful_shutdown_s": 1,
            "api_key": KEY, "max_body_bytes": MAX_BODY, "request_timeout_s": 1.0, "shared_weights": False}
    return _shared_app("keyed_app", serve_session, args, KEYED_APP, "/keyed")


SHARED_FIXTURES = ("pair_app", "keyed_app", "worker_groups")  # each deleted or stopped after its last user


def pytest_collection_modifyitems(session, config, items) -> None:
    """Modules that share an app (or the worker groups) run one after another (where the first of them would), so the
    app is deployed once and deleted before the next module deploys its own; tests marked ``own_ray`` run before all
    others."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item)
    order = list(modules)
    for fixture in SHARED_FIXTURES:
        users = [m for m in order if any(fixture in item.fixturenames for item in modules[m])]
        for m in users[1:]:
            order.remove(m)
            order.insert(order.index(users[0]) + users.index(m), m)
    items[:] = [item for m in order for item in modules[m]]
    # tests that start a Ray of their own go first: the session's Ray, once started, costs a slice of a core even idle
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is None)  # stable: the order above is kept


def pytest_collection_finish(session) -> None:
    """Each shared fixture's last user among the tests that will run (after ``-k``/``-m`` deselected some)."""
    _last_user.clear()
    for item in session.items:
        for fixture in SHARED_FIXTURES:
            if fixture in item.fixturenames:
                _last_user[fixture] = item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    """After a shared fixture's last user, delete its app or stop its workers (first: the session's Serve is shut
    down after the last test)."""
    for fixture, nodeid in _last_user.items():
        if item.nodeid == nodeid and fixture in _live_shared:
            _live_shared.pop(fixture).close()

