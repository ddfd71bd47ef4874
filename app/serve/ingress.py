"""The ingress deployment: OpenAI-compatible HTTP (FastAPI) and gRPC in front of the pools.

It tokenizes once, lets the ``Router`` pick a pool for the request, waits for the first update (prefill done,
so the strategy is known) and only then answers, so that even a streamed response carries ``x-dynpart-pool`` and
``x-dynpart-strategy`` headers (the body, its usage and a stream's events: ``responses``; ``/health``: the load
board's view, ``board_view``). Errors (``app.serve.errors``): bad input 400 (404 for an unknown model), no or a wrong
API key 401, a body too large 413 or not JSON 415, overload 503 with ``retry-after``, a failed replica 503, a failed
sequence 500, past the request timeout 504; OpenAI's error body. ``/openapi.json`` documents them route by route.
"""

# No ``from __future__ import annotations``: FastAPI must see the real body types through Serve's wrapper.
import functools
import time
from collections.abc import Awaitable
import grpc
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from app.engine.messages import RequestError
from app.engine.params import SamplingParams
from app.serve.api import (CHAT_MAX_TOKENS, COMPLETION_MAX_TOKENS, MAX_CHOICES, ChatMessage, ChatRequest,
                           CompletionRequest, GenerationRequest, check_max_tokens, choice_params, sampling_params)
from app.serve.bodies import choice_body, completion_body, new_id
from app.serve.config import AppConfig
from app.serve.dispatch import PoolHandles
from app.serve.errors import ApiError, ModelNotFound, api_error, documented, error_response, too_large
from app.serve.guard import Limits, check_key, check_peer
from app.serve.metrics import record_request
from app.serve.protos import dynpart_pb2 as pb
from app.serve.responses import (ClosingStreamingResponse, Logprobs, Result, Run, best, done, finished_together,
                                 headers_of, interleaved, sse, started_together, usage_of)
from app.serve.http_app import GENERATION_RESPONSES, HEALTH_RESPONSES, api
from app.serve.router import Router

@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, cfg: dict, handles: dict[str, dict], board=None):
        self.cfg = AppConfig.model_validate(cfg)
        self.router = Router(self.cfg, {name: PoolHandles(**h) for name, h in handles.items()}, board)
        try:
            self.router.board.watch()  # so the first /health already knows the pools
        except RuntimeError:  # no running event loop here: the first request starts it
            pass
        self.api_key = self.cfg.api_key.get_secret_value() if self.cfg.api_key else None
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda t: self.router.tokenizer.decode([t]))
        api.state.guard = Limits(max_body_bytes=self.cfg.max_body_bytes, api_key=self.api_key)

    # -- shared by HTTP and gRPC --------------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model and model not in (self.cfg.model_name, self.cfg.model):
            raise ModelNotFound(f"model {model!r} is not served here; this server serves {self.cfg.model_name!r}")

    async def _start(self, prompt_ids: list[int], params: SamplingParams, pool: str | None, strategy: str | None,
                     whole: bool = False) -> Run:
        """Route and run up to the first update: prefill done, or with ``whole`` (a non-streaming request) the
        whole answer. The request timeout runs from here. A ``max_tokens`` the client did not send is lowered to what
        the limit and the context of the pools it may go to leave for the prompt (an unset max_tokens is never the
        reason for a 400)."""
        contexts = [p.context(self.router.shape.max_position_embeddings) for p in self.cfg.pools
                    if not pool or p.name == pool]
        if params.max_tokens_default and contexts:
            params.max_tokens = max(1, min(params.max_tokens, self.cfg.max_tokens_limit,
                                           max(contexts) - len(prompt_ids)))
        check_max_tokens(params.max_tokens, self.cfg.max_tokens_limit)
        strategy = strategy or self.cfg.default_strategy
        started = time.perf_counter()
        try:
            route, retries, first, updates = await self.router.start(prompt_ids, params, pool or None, strategy,
                                                                     whole, self.cfg.request_timeout_s)
        except Exception as e:  # labelled by configured pool names only: a header cannot create metric series
            label = "none" if not pool else pool if any(p.name == pool for p in self.cfg.pools) else "unknown"
            record_request(label, None, str(api_error(e).status))
            raise
        result = Result(pool=route.pool.name, devices=route.pool.devices, whole=whole, retries=retries,
                        started=started, route=route, learn=self.router.learn)
        result.add(first)
        return Run(result, first, updates)

    async def _start_choices(self, prompts: list[list[int]], params: SamplingParams, sampled: int, kept: int,
                             pool: str | None, strategy: str | None, whole: bool = False) -> list[Run]:
        """Each prompt's ``sampled`` sequences (``choice_params``: seed + j), prompts concurrently; run i * sampled + j
        is prompt i's j-th. A prompt's first sequence runs to its first update (prefill done: its full blocks are in
        the replica's prefix cache) before the others start, on its pool, so they compute only the prompt's last
        partial block: the prompt is prefilled once. A failure to start one closes the others."""
        async def listed(run: Awaitable[Run]) -> list[Run]:
            return [await run]

        async def prompt_runs(ids: list[int]) -> list[Run]:
            first = await self._start(ids, choice_params(params, 0, sampled, kept), pool, strategy,
                                      whole and sampled == 1)
            try:
                rest = await started_together([listed(self._start(ids, choice_params(params, j, sampled, kept),
                                                                  first.result.pool, strategy, whole))
                                               for j in range(1, sampled)])
            except BaseException:
                await first.rest.aclose()
                raise
            for run in rest:  # the prompt was scored once, by the first
                run.first.prompt_logprobs = run.result.prompt_logprobs = first.result.prompt_logprobs
            return [first, *rest]

        return await started_together([prompt_runs(ids) for ids in prompts])

    def _prepare(self, body: GenerationRequest, chat: bool) -> tuple[list[list[int]], SamplingParams]:
        """The request's prompts as token ids (chat: one) and its sampling params."""
        self._check_model(body.model)
        for field in ("max_tokens", "max_completion_tokens"):  # named as sent: the request model sets no ceiling
            check_max_tokens(getattr(body, field, None), self.cfg.max_tokens_limit, field)
        if chat:
            prompts = [self.router.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])]
        else:
            prompts = [self.router.encode(p) for p in body.prompts]
        return prompts, body.sampling(CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS)

    # -- HTTP ---------------------------------------------------------------------------------------------------------

    @api.get("/health", responses=HEALTH_RESPONSES)
    async def health(self) -> JSONResponse:
        """200 while the app serves (ok, or degraded while a pool is being replaced), else 503."""
        health = self.router.board.health()
        code = 200 if health.status in ("ok", "degraded") else 503
        return JSONResponse(health.model_dump(), status_code=code)

    @api.get("/v1/models", responses=documented(401, 503))
    async def models(self):
        """The served model, once every pool has a warmed replica (before that, 503: the first request would wait
        for engines still starting)."""
        if not self.router.board.ready and self.router.board.health().status != "ok":
            return ApiError(503, "unavailable_error", grpc.StatusCode.UNAVAILABLE,
                            "this server is starting: not every pool has a warmed replica yet").response()
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "dynpart", "root": self.cfg.model}]}

    @api.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._openai(body, request, chat=False)

    @api.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(self, body: ChatRequest, request: Request):
        return await self._openai(body, request, chat=True)

    async def _openai(self, body: GenerationRequest, request: Request, chat: bool):
        try:
            prompts, params = self._prepare(body, chat)
            kept, sampled = body.n or 1, body.choices(len(prompts))
            runs = await self._start_choices(prompts, params, sampled, kept, request.headers.get("x-dynpart-pool"),
                                             request.headers.get("x-dynpart-strategy"), whole=not body.stream)
        except Exception as e:
            return error_response(e)
        rid = new_id("chatcmpl" if chat else "cmpl")
        results, prompt_tokens = [r.result for r in runs], sum(map(len, prompts))
        logprobs = (lambda: Logprobs(self.token_text, chat)) if params.logprobs is not None else None  # noqa: E731
        echoes = [""] * len(prompts) if chat or not body.echo else [
            text if isinstance(text, str) else self.router.tokenizer.decode(ids)
            for text, ids in zip(body.prompts, prompts)]
        if body.stream:  # best_of > n is refused: every run is a choice
            return ClosingStreamingResponse(
                sse(rid, body, runs, chat, prompt_tokens, logprobs and [logprobs() for _ in runs],
                    [echoes[k // sampled] for k in range(len(runs))]),
                media_type="text/event-stream", headers=headers_of(results))
        try:
            await finished_together(runs)  # the caller cancelled (client gone): the generations are cancelled now
        except Exception as e:
            done(runs[0].result, str(api_error(e).status))
            return error_response(e)
        done(runs[0].result)
        choices = []
        for i, echo in enumerate(echoes):
            for j, run in enumerate(best(runs[i * sampled:(i + 1) * sampled], kept)):
                r = run.result
                lp = logprobs().body([*(r.prompt_logprobs or []), *r.logprobs]) if logprobs else None
                choices.append(choice_body(i * kept + j, echo + r.text, r.finish_reason, chat, lp))
        return JSONResponse(completion_body(rid, body.model, choices, usage_of(results, prompt_tokens), chat),
                            headers=headers_of(results))

    # -- gRPC ---------------------------------------------------------------------------------------------------------

    def _grpc_prepare(self, req: pb.GenerateRequest, ctx) -> tuple[list[int], SamplingParams, int]:
        """The HTTP path's checks for a gRPC request: key (``authorization`` metadata), size, model, fields; its
        prompt, sampling params and choices (``n``, 0: 1)."""
        if ctx is not None:  # None: called through a handle, not from the network
            check_peer(ctx.peer(), self.cfg.grpc_remote_clients)
            check_key(self.api_key, dict(ctx.invocation_metadata()).get("authorization"))
        if req.ByteSize() > self.cfg.max_body_bytes:  # as HTTP's 413: RESOURCE_EXHAUSTED, gRPC's "too large"
            raise too_large(self.cfg.max_body_bytes)
        self._check_model(req.model)
        if req.messages:
            messages = [ChatMessage(role=m.role, content=m.content) for m in req.messages]
            ids = self.router.encode_chat([{"role": m.role, "content": m.text()} for m in messages])
        elif req.prompt:
            ids = self.router.encode(req.prompt)
        else:
            raise RequestError("set prompt or messages")
        params = sampling_params(
            COMPLETION_MAX_TOKENS, req.max_tokens or None, list(req.stop), temperature=req.temperature,
            top_p=req.top_p or 1.0,
            top_k=req.top_k, seed=req.seed if req.HasField("seed") else None, ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty or 1.0, logit_bias=dict(req.logit_bias), min_p=req.min_p,
            min_tokens=req.min_tokens, stop_token_ids=list(req.stop_token_ids),
            skip_special_tokens=req.skip_special_tokens if req.HasField("skip_special_tokens") else None,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=req.logprobs if req.HasField("logprobs") else None,
            prompt_logprobs=req.prompt_logprobs if req.HasField("prompt_logprobs") else None)
        if req.n > MAX_CHOICES:
            raise RequestError(f"n ({req.n}) is more than this server's limit of {MAX_CHOICES} choices per request",
                               param="n")
        return ids, params, req.n or 1

    @staticmethod
    def _grpc_error(ctx, e: BaseException) -> None:
        api_error(e).to_grpc(ctx)

    @staticmethod
    def _info(r: Result) -> pb.DynpartInfo:
        u = usage_of(r).dynpart
        return pb.DynpartInfo(pool=u.pool, strategy=u.strategy or "", prefill_ms=u.prefill_ms, ttft_ms=u.ttft_ms or 0,
                              tpot_ms=u.tpot_ms or 0, devices=u.devices, cached_tokens=u.cached_tokens)

    def _pb_logprobs(self, entries) -> list[pb.TokenLogprob]:
        top = lambda t, lp: pb.TopLogprob(token_id=t, token=self.token_text(t), logprob=lp)  # noqa: E731
        return [pb.TokenLogprob(token_id=e.token, token=self.token_text(e.token), logprob=e.logprob,
                                top_logprobs=[top(t, lp) for t, lp in e.top]) for e in entries or ()]

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateReply:  # noqa: N802
        try:
            ids, params, n = self._grpc_prepare(request, grpc_context)
            runs = await self._start_choices([ids], params, n, n, request.pool, request.strategy, whole=True)
            await finished_together(runs)
        except Exception as e:
            self._grpc_error(grpc_context, e)
            return pb.GenerateReply()
        done(runs[0].result)
        r = runs[0].result
        choices = [pb.Choice(index=i, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason or "",
                             completion_tokens=len(c.token_ids), logprobs=self._pb_logprobs(c.logprobs))
                   for i, c in enumerate(run.result for run in runs)]
        return pb.GenerateReply(text=r.text, token_ids=r.token_ids, finish_reason=r.finish_reason or "",
                                prompt_tokens=r.prompt_tokens, completion_tokens=len(r.token_ids),
                                dynpart=self._info(r), logprobs=self._pb_logprobs(r.logprobs),
                                prompt_logprobs=self._pb_logprobs(r.prompt_logprobs), choices=choices)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None):  # noqa: N802
        try:
            ids, params, n = self._grpc_prepare(request, grpc_context)
            runs = await self._start_choices([ids], params, n, n, request.pool, request.strategy)
        except Exception as e:
            self._grpc_error(grpc_context, e)
            return
        updates = interleaved(runs)
        try:
            async for i, update in updates:  # a choice's first and last chunks carry its figures
                figures = update is runs[i].first or update.finish_reason is not None
                yield pb.GenerateChunk(index=i, text=update.text, token_ids=update.token_ids,
                                       finish_reason=update.finish_reason or "",
                                       dynpart=self._info(runs[i].result) if figures else None,
                                       logprobs=self._pb_logprobs(update.logprobs),
                                       prompt_logprobs=self._pb_logprobs(update.prompt_logprobs))
        except Exception as e:
            self._grpc_error(grpc_context, e)
            return
        finally:  # the client cancelled (this generator closed at a yield): cancel the generations now, not at GC
            await updates.aclose()
        done(runs[0].result)
