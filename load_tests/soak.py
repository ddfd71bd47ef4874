"""The soak: many mixed requests at the highest load a config sustains; every request accounted for, nothing leaked.

Requests of every kind a service meets, drawn at random: short completions and chats, long documents, streamed and
not, some cancelled by their client mid-stream, some invalid on purpose. The client is polite: a 503 (overload, with
``retry-after``) is retried after the time it names. Each request ends as exactly one of ``200``, ``200-stream``,
``cancelled``, ``400`` (only the invalid ones), ``503`` (still refused after 50 tries) or ``unexpected <status>``
(a failure of the soak); ``lost`` = requests sent minus requests that ended, and must be 0.

``python -m load_tests.soak`` (``make soak``) deploys the shipped config, warms every path, then runs 1,000 requests
in two halves and reports the outcomes, the achieved rate, and the resident memory of every engine and ingress
process after the warm-up and after each half. The KV caches are reserved untouched (``torch.empty``: a CPU page is
resident once a block first fills), so the first half's growth includes pages first touched; a leak shows as growth
in the second half (aim: under 5%). ``tests/test_reliability.py`` runs a short one on a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter

import httpx

from load_tests.chaos import rss_mb

WORDS = "the lighthouse keeper wrote down every ship that passed in a long careful hand".split()


async def mixed_requests(base: str, n: int, concurrency: int, model: str, seed: int = 0, long_words: int = 0,
                         max_tokens: int = 8, timeout_s: float = 300) -> Counter:
    """``n`` requests of every kind, ``concurrency`` in flight; how each ended (``503 (retried)`` counts the
    refusals that were retried, not requests). ``long_words``: the length of the long documents (0: none)."""
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    gate = asyncio.Semaphore(concurrency)
    kinds = ["completion", "completion", "chat", "stream", "chat-stream", "cancel", "bad"] + ["long"] * bool(long_words)

    async def send(c: httpx.AsyncClient, path: str, body: dict, leave_after: int | None) -> tuple[int, str, float]:
        """(status, body text, retry-after) of one try; a streamed body is read to ``[DONE]``, or left after
        ``leave_after`` events (the client cancels)."""
        async with gate, c.stream("POST", path, json=body) as r:
            retry_after = float(r.headers.get("retry-after", 1))
            if not body["stream"] or r.status_code != 200:
                return r.status_code, (await r.aread()).decode(), retry_after
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if leave_after is not None and len(events) >= leave_after:
                        return r.status_code, "left", retry_after
            return r.status_code, "\n".join(events), retry_after

    async def one(c: httpx.AsyncClient, i: int) -> None:
        kind = rng.choice(kinds)
        mt = rng.randint(1, max_tokens)
        if kind.startswith("chat"):
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Say {i}"}]}
        elif kind == "long":
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(long_words // 2, long_words)))
            path, body = "/v1/completions", {"prompt": text}
        else:
            path, body = "/v1/completions", {"prompt": "word " * rng.randint(1, 60)}
        stream = kind.endswith("stream") or kind == "cancel" or (kind == "long" and rng.random() < 0.5)
        body = {"model": model, "max_tokens": mt if kind != "cancel" else max(mt, 4),
                "temperature": rng.choice([0, 0.8]), "ignore_eos": True, **body, "stream": stream}
        if kind == "bad":
            body["top_k"] = -1
        for _ in range(50):
            status, text, retry_after = await send(c, path, body, 2 if kind == "cancel" else None)
            if status != 503:
                break
            assert json.loads(text)["error"]["type"] in ("overloaded_error", "unavailable_error"), text
            outcomes["503 (retried)"] += 1
            await asyncio.sleep(rng.uniform(0.2, 1.0) * retry_after)
        if status == 200 and text == "left":
            outcome = "cancelled"
        elif status == 200 and stream:
            ok = text.endswith("data: [DONE]") and '"finish_reason": "length"' in text and '"error"' not in text
            outcome = "200-stream" if ok else "unexpected stream end"
        elif status == 200:
            outcome = "200" if json.loads(text)["usage"]["completion_tokens"] == mt else "unexpected length"
        elif status == 503:
            outcome = "503"
        elif status == 400 and kind == "bad":
            outcome = "400"
        else:
            outcome = f"unexpected {status}"
        outcomes[outcome] += 1

    async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as c:
        await asyncio.gather(*(one(c, i) for i in range(n)))
    return outcomes


def ended(outcomes: Counter) -> int:
    """Requests that ended one way or another (refusals that were retried are not requests)."""
    return sum(v for k, v in outcomes.items() if k != "503 (retried)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="serve_config.yaml")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=24, help="requests in flight (past the config's capacity: "
                                                                "admission control must answer 503, not queue)")
    ap.add_argument("--long-words", type=int, default=900, help="length of the long documents, words")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    import ray
    import yaml
    from ray import serve

    from app.serve.app import build_app
    from app.serve.config import AppConfig
    from load_tests.chaos import engine_pids, ingress_pids, replica_infos

    spec = yaml.safe_load(open(args.config))["applications"][0]
    cfg = AppConfig.model_validate(spec["args"])
    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    app, route = "soak", "/soak"
    serve.run(build_app(cfg.model_dump()), name=app, route_prefix=route)
    base = f"http://127.0.0.1:8000{route}"

    def processes() -> list[int]:
        infos = [i for p in cfg.pools for i in replica_infos(app, p.name, p.num_replicas)]
        return engine_pids(infos) + ingress_pids(app)

    run = lambda n, seed: asyncio.run(mixed_requests(base, n, args.concurrency, cfg.model_name, seed,  # noqa: E731
                                                     args.long_words, args.max_tokens))
    print("warm-up: 60 requests", flush=True)
    run(60, 1)
    pids = processes()
    rss = [rss_mb(pids)]
    t0 = time.monotonic()
    halves = (args.requests // 2, args.requests - args.requests // 2)
    outcomes: Counter = Counter()
    for seed, n in enumerate(halves, start=2):  # two halves: the second shows growth once every KV page was touched
        outcomes += run(n, seed)
        time.sleep(2)
        rss.append(rss_mb(pids))
        print(f"after {sum(halves[:seed - 1])} requests: RSS {rss[-1]:.0f} MB", flush=True)
    elapsed = time.monotonic() - t0
    same = processes() == pids
    lost = args.requests - ended(outcomes)
    kv_gb = sum(p.devices * (p.kv_cache_memory_gb or 0) * p.num_replicas for p in cfg.pools)
    print(f"soak: {args.requests} requests, {args.concurrency} in flight, in {elapsed:.0f} s "
          f"({args.requests / elapsed:.2f} req/s): {dict(sorted(outcomes.items()))}; lost {lost}")
    print(f"RSS of {len(pids)} engine and ingress processes: {rss[0]:.0f} -> {rss[1]:.0f} -> {rss[2]:.0f} MB "
          f"(first half {(rss[1] / rss[0] - 1) * 100:+.1f}%, second half {(rss[2] / rss[1] - 1) * 100:+.1f}%; "
          f"the KV caches reserve {kv_gb:.1f} GB whose pages are touched as blocks first fill); "
          f"same processes throughout: {same}")
    serve.delete(app)


if __name__ == "__main__":
    main()
