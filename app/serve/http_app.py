"""The FastAPI app the ingress serves its routes on: every error in OpenAI's body, the schema as the routes answer.

FastAPI's own answers are made OpenAI's here, once for every route: a validation error is a 400 naming the field and
the limit it broke (not FastAPI's 422, which the schema stops documenting), and Starlette's errors (unknown route,
wrong method, a body it cannot parse) carry the same error body. The request guard (size, type, API key) wraps it.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' real types.
import functools

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.serve.bodies import error_body
from app.serve.board_view import Health
from app.serve.errors import documented, validation_message
from app.serve.guard import Guard, Limits

api = FastAPI(title="dynpart", description="OpenAI-compatible API of dynpart")
api.add_middleware(Guard)
api.state.guard = Limits()  # the defaults until the ingress sets this app's limits


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 → the 400 OpenAI answers, naming the field and the limit it broke (or the fields an empty body
    lacks)."""
    body = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(body, "field_info", None), "annotation", None)
    required = [name for name, f in getattr(model, "model_fields", {}).items() if f.is_required()]
    where, message = validation_message(exc.errors(), required)
    return JSONResponse(error_body(message, param=where), status_code=400)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without the 422 it documents for every route with a body: validation errors answer 400 here
    (each route's ``responses`` say what it answers). Bound to its app, not to this module's global: Serve's ingress
    serves a copy of the app, which must describe its own routes."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for route in schema["paths"].values():
            for operation in route.values():
                operation["responses"].pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


api.openapi = functools.partial(_openapi, api)
# The error statuses each route can answer (app.serve.errors.MEANING says why): bad input 400, the API key 401, the
# guard's 413 and 415 (POST bodies only), another model 404, a failed sequence 500, overload or a failed replica 503,
# the request timeout 504. A 200 is JSON, or server-sent events with ``stream: true``.
GENERATION_RESPONSES = {200: {"description": "The completion (JSON), or with stream: true server-sent events "
                                             "ending in 'data: [DONE]'",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        **documented(400, 401, 404, 413, 415, 500, 503, 504)}


HEALTH_RESPONSES = {200: {"model": Health, "description": "Live: ok, or degraded while a pool is being replaced"},
                    503: {"model": Health, "description": "Not ready (starting), no pool serving, or draining"}}


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method, a body it cannot parse) in OpenAI's error body."""
    message = str(exc.detail)
    if message == "There was an error parsing the body":
        message = "the request body could not be parsed: send a JSON object in UTF-8"
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)
