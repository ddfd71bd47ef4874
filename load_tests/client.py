"""An asynchronous load generator against the OpenAI-compatible streaming endpoint.

Timings are taken at the client (TTFT and inter-token gaps include the network and the server's queueing), one
``RequestRecord`` per request. Arrivals are Poisson at a rate, or a fixed concurrency; the run is bounded by a request
count or a duration; nothing is retried and every request ends as a success or a named error.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Sequence

import httpx
from tqdm import tqdm

from load_tests.metrics import RequestRecord
from cost.workloads import Request


class PromptMaker:
    """Prompts of an exact token length, built from the model's own single-token words (seeded)."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tok = tokenizer
        vocab = range(min(len(tokenizer), 50_000))
        words = [tokenizer.decode([t]) for t in vocab]
        self.words = [w for w in words if re.fullmatch(r" [a-z]{3,9}", w)]
        self.rng = random.Random(seed)

    def make(self, tokens: int) -> str:
        text = "".join(self.rng.choice(self.words) for _ in range(tokens))
        ids = self.tok(text)["input_ids"]
        return self.tok.decode(ids[:tokens])


async def _one_whole(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord,
                     timeout_s: float) -> None:
    """A non-streaming request: the whole answer arrives at once (its one "chunk" is the answer)."""
    try:
        async with asyncio.timeout(timeout_s):
            resp = await client.post(url, json=body)
        record.named_by(resp.headers)
        if resp.status_code != 200:
            record.error = f"http_{resp.status_code}"
            return
        record.done_s = time.perf_counter()
        record.chunk_times_s.append(record.done_s)
        record.output_tokens = resp.json()["usage"]["completion_tokens"]
    except TimeoutError:
        record.error = "timeout"
    except httpx.HTTPError as e:
        record.error = type(e).__name__


async def _one(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord, timeout_s: float) -> None:
    text_parts: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, json=body) as resp:
                record.named_by(resp.headers)
                if resp.status_code != 200:
                    await resp.aread()
                    record.error = f"http_{resp.status_code}"
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = "stream_error"
                        return
                    choices = chunk.get("choices") or []
                    piece = choices[0].get("text") or (choices[0].get("delta") or {}).get("content") if choices else None
                    if piece:
                        record.chunk_times_s.append(time.perf_counter())
                        text_parts.append(piece)
                    usage = chunk.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        record.output_tokens = usage["completion_tokens"]
                        record.pool = record.pool or (usage.get("dynpart") or {}).get("pool")
                        record.strategy = record.strategy or (usage.get("dynpart") or {}).get("strategy")
        record.done_s = time.perf_counter()
        if not record.output_tokens:
            record.output_tokens = len(record.chunk_times_s)
    except TimeoutError:
        record.error = "timeout"
    except httpx.HTTPError as e:
        record.error = type(e).__name__


async def run_load(base_url: str, model: str, requests: Sequence[Request], prompts: Sequence[str], *,
                   rate: float | None = None, concurrency: int | None = None, duration_s: float | None = None,
                   timeout_s: float = 600.0, progress: bool = True, extra_body: dict | None = None,
                   seed: int = 0, stream: bool = True, headers: dict[str, str] | None = None,
                   ) -> tuple[list[RequestRecord], float]:
    """Send ``requests`` (prompt/output lengths) with Poisson arrivals at ``rate`` req/s (inf: all at once), or
    keeping ``concurrency`` in flight; stop issuing after ``duration_s``. Returns the records and wall time.
    ``stream=False`` asks for whole answers (TTFT is then the whole latency; TPOT is not observable). ``headers``
    go with every request (``x-dynpart-pool`` pins a pool)."""
    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    records: list[RequestRecord] = []
    bar = tqdm(total=len(requests), desc="requests", disable=not progress, unit="req")
    start = time.perf_counter()

    async def issue(client, req: Request, prompt: str) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": req.output_tokens, "stream": stream,
                "temperature": 0.0, "ignore_eos": True, **(extra_body or {})}  # ignore_eos: lengths as asked
        if stream:
            body["stream_options"] = {"include_usage": True}
        record = RequestRecord(prompt_tokens=req.prompt_tokens, sent_s=time.perf_counter())
        records.append(record)
        try:
            await (_one if stream else _one_whole)(client, url, body, record, timeout_s)
        finally:
            bar.update(1)
            if limit:
                limit.release()

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, headers=headers) as client:
        tasks = []
        for req, prompt in zip(requests, prompts, strict=True):
            if duration_s is not None and time.perf_counter() - start >= duration_s:
                break
            if limit:
                await limit.acquire()
            elif rate and rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.create_task(issue(client, req, prompt)))
        await asyncio.gather(*tasks)
    bar.close()
    return records, time.perf_counter() - start
