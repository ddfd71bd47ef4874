"""The ingress deployment: OpenAI-compatible HTTP (FastAPI) and gRPC in front of the pools.

It tokenizes once, lets the ``Router`` classify the request onto a pool, waits for the first update (prefill done,
so the strategy is known) and only then answers, so that even a streamed response carries ``x-dynpart-pool`` and
``x-dynpart-strategy`` headers. Errors: bad input 400 (404 for an unknown model), overload 503, OpenAI's error body.
"""

# No ``from __future__ import annotations``: FastAPI must see the real body types through Serve's wrapper.
import asyncio
import json
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from app.api import (ChatRequest, CompletionRequest, DynpartUsage, Usage, _Common, chunk_body, completion_body,
                     error_body, new_id)
from app.engine import RequestError
from app.engine_loop import Update
from app.metrics import record_request
from app.pools import AppConfig
from app.protos import dynpart_pb2 as pb
from app.router import Overloaded, PoolHandles, Result, Router
from app.sampling import SamplingParams

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions
CHAT_MAX_TOKENS = 256

api = FastAPI(title="dynpart", description="OpenAI-compatible API of dynpart")


class ModelNotFound(LookupError):
    pass


def error_status(e: BaseException) -> tuple[int, str]:
    """HTTP status and message of an exception raised here or inside a replica (Ray wraps those)."""
    cause = getattr(e, "cause", None) or e
    from ray.serve.exceptions import BackPressureError

    if isinstance(cause, ModelNotFound):
        return 404, str(cause)
    if isinstance(cause, (RequestError, ValidationError, ValueError)):
        return 400, _first_line(cause)
    if isinstance(cause, (Overloaded, BackPressureError)):
        return 503, str(cause) if isinstance(cause, Overloaded) else "the pool's request queue is full; retry later"
    return 500, f"internal error: {type(cause).__name__}: {cause}"


def _first_line(e: BaseException) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def error_response(e: BaseException) -> JSONResponse:
    status, message = error_status(e)
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}.get(status, "server_error")
    headers = {"retry-after": "1"} if status == 503 else None
    return JSONResponse(error_body(message, kind, code="model_not_found" if status == 404 else None),
                        status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    return JSONResponse(error_body(f"{where}: {err.get('msg')}" if where else str(err.get("msg")), param=where or None),
                        status_code=400)


def usage_of(r: Result) -> Usage:
    ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
    return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=len(r.token_ids),
                 total_tokens=r.prompt_tokens + len(r.token_ids),
                 dynpart=DynpartUsage(pool=r.pool, strategy=r.strategy, prefill_ms=ms(r.prefill_s) or 0.0,
                                      ttft_ms=ms(r.ttft_s), tpot_ms=ms(r.tpot_s), devices=r.devices))


def headers_of(r: Result) -> dict[str, str]:
    return {"x-dynpart-pool": r.pool, "x-dynpart-strategy": r.strategy or "none",
            "x-dynpart-prefill-ms": f"{r.prefill_s * 1e3:.3f}"}


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, cfg: dict, handles: dict[str, dict]):
        self.cfg = AppConfig.model_validate(cfg)
        self.router = Router(self.cfg, {name: PoolHandles(**h) for name, h in handles.items()})

    # -- shared by HTTP and gRPC --------------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model and model not in (self.cfg.model_name, self.cfg.model):
            raise ModelNotFound(f"model {model!r} is not served here; this server serves {self.cfg.model_name!r}")

    async def _start(self, prompt_ids: list[int], params: SamplingParams, pool: str | None,
                     strategy: str | None) -> tuple[Result, Update, AsyncIterator[Update]]:
        """Route and run up to the first update (prefill done)."""
        strategy = strategy or self.cfg.default_strategy
        route = await self.router.classify(len(prompt_ids), params.max_tokens, pool or None, strategy)
        result = Result(pool=route.pool.name, devices=route.pool.devices)
        updates = self.router.run(route, prompt_ids, params, strategy)
        try:
            first = await anext(updates)
        except BaseException as e:
            record_request(route.pool.name, None, str(error_status(e)[0]))
            raise
        result.add(first)
        return result, first, updates

    @staticmethod
    def _done(r: Result, status: str = "200") -> None:
        record_request(r.pool, r.strategy, status, r.ttft_s, r.tpot_s, r.prefill_s)

    def _prepare(self, body: _Common, chat: bool) -> tuple[list[int], SamplingParams]:
        self._check_model(body.model)
        if chat:
            ids = self.router.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            ids = self.router.encode(body.prompt)
        return ids, body.sampling(CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS)

    # -- HTTP ---------------------------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self):
        """200 once every pool has a replica that answers (so a started app is a ready one), else 503."""
        pools = [p.name for p in self.cfg.pools]
        try:
            await asyncio.wait_for(asyncio.gather(*(self.router.pool_info(p) for p in pools)), timeout=5)
        except Exception as e:  # noqa: BLE001 - a pool still starting, or a replica failing
            return JSONResponse({"status": "unavailable", "reason": f"{type(e).__name__}: {e}"}, status_code=503)
        return {"status": "ok", "model": self.cfg.model_name, "pools": pools}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "dynpart", "root": self.cfg.model}]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._openai(body, request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        return await self._openai(body, request, chat=True)

    async def _openai(self, body: _Common, request: Request, chat: bool):
        try:
            ids, params = self._prepare(body, chat)
            result, first, rest = await self._start(ids, params, request.headers.get("x-dynpart-pool"),
                                                    request.headers.get("x-dynpart-strategy"))
        except Exception as e:
            return error_response(e)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return StreamingResponse(self._sse(rid, body, result, first, rest, chat), media_type="text/event-stream",
                                     headers=headers_of(result))
        try:
            async for update in rest:
                result.add(update)
        except Exception as e:
            self._done(result, str(error_status(e)[0]))
            return error_response(e)
        self._done(result)
        return JSONResponse(completion_body(rid, body.model, result.text, result.finish_reason, usage_of(result), chat),
                            headers=headers_of(result))

    async def _sse(self, rid: str, body: _Common, result: Result, first: Update, rest: AsyncIterator[Update],
                   chat: bool) -> AsyncIterator[str]:
        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        role = chat
        update: Update | None = first
        try:
            while update is not None:
                if update.text or update.finish_reason or role:
                    yield event(chunk_body(rid, body.model, update.text, update.finish_reason, chat, role=role))
                    role = False
                update = await anext(rest, None)
                if update is not None:
                    result.add(update)
        except Exception as e:  # headers are gone: report in-band, as OpenAI does
            self._done(result, str(error_status(e)[0]))
            yield event(error_body(error_status(e)[1], "server_error"))
            return
        self._done(result)
        if body.include_usage:
            yield event(chunk_body(rid, body.model, None, None, chat, usage=usage_of(result)))
        yield "data: [DONE]\n\n"

    # -- gRPC ---------------------------------------------------------------------------------------------------------

    def _grpc_prepare(self, req: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        self._check_model(req.model)
        if req.messages:
            ids = self.router.encode_chat([{"role": m.role, "content": m.content} for m in req.messages])
        elif req.prompt:
            ids = self.router.encode(req.prompt)
        else:
            raise RequestError("set prompt or messages")
        params = SamplingParams(max_tokens=req.max_tokens or COMPLETION_MAX_TOKENS, temperature=req.temperature,
                                top_p=req.top_p or 1.0, top_k=req.top_k,
                                seed=req.seed if req.HasField("seed") else None, stop=list(req.stop),
                                ignore_eos=req.ignore_eos)
        return ids, params

    @staticmethod
    def _grpc_error(ctx, e: BaseException) -> None:
        status, message = error_status(e)
        code = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                503: grpc.StatusCode.UNAVAILABLE}.get(status, grpc.StatusCode.INTERNAL)
        ctx.set_code(code)
        ctx.set_details(message)

    @staticmethod
    def _info(r: Result) -> pb.DynpartInfo:
        u = usage_of(r).dynpart
        return pb.DynpartInfo(pool=u.pool, strategy=u.strategy or "", prefill_ms=u.prefill_ms, ttft_ms=u.ttft_ms or 0,
                              tpot_ms=u.tpot_ms or 0, devices=u.devices)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateReply:  # noqa: N802
        try:
            result, _, rest = await self._start(*self._grpc_prepare(request), request.pool, request.strategy)
            async for update in rest:
                result.add(update)
        except Exception as e:
            self._grpc_error(grpc_context, e)
            return pb.GenerateReply()
        self._done(result)
        return pb.GenerateReply(text=result.text, token_ids=result.token_ids, finish_reason=result.finish_reason or "",
                                prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids),
                                dynpart=self._info(result))

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None):  # noqa: N802
        try:
            result, update, rest = await self._start(*self._grpc_prepare(request), request.pool, request.strategy)
        except Exception as e:
            self._grpc_error(grpc_context, e)
            return
        yield pb.GenerateChunk(text=update.text, token_ids=update.token_ids, finish_reason=update.finish_reason or "",
                               dynpart=self._info(result))
        try:
            async for update in rest:
                result.add(update)
                last = update.finish_reason is not None
                yield pb.GenerateChunk(text=update.text, token_ids=update.token_ids,
                                       finish_reason=update.finish_reason or "",
                                       dynpart=self._info(result) if last else None)
        except Exception as e:
            self._grpc_error(grpc_context, e)
            return
        self._done(result)

