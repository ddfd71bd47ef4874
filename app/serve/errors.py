"""What every failure looks like to a client, in one table: HTTP status, OpenAI error type, gRPC code.

Exceptions raised anywhere (the ingress, the router, inside an engine replica: Ray wraps those, the original is
``e.cause``) are classified here once; the HTTP answer, the in-band SSE error, the gRPC status and the
``dynpart_requests_total{status}`` metric all come from the same ``ApiError``. Messages name the field and the limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.engine.messages import EngineFailed, RequestError
from app.serve.bodies import ErrorResponse, error_body

RETRY_AFTER_S = 1

# What each HTTP status answers here, for the OpenAPI schema; each comes with ``ErrorResponse`` as its body.
MEANING = {
    400: "Bad input: an unknown field, an out-of-range value, malformed JSON or UTF-8, a missing field, max_tokens "
         "past the server's limit, a prompt that fits no pool's context, an unknown pool or strategy",
    401: "No or a wrong API key (only when the app is configured with one)",
    404: "The request names a model this server does not serve",
    413: "The request body is larger than the server's max_body_bytes",
    415: "A content type other than JSON",
    500: "A fault of the server, not of the request: this request's own sampling or detokenization failed (the rest "
         "of its batch goes on), or a bug",
    503: "The chosen pool is full, or its replica failed and is being replaced: retry after retry-after seconds",
    504: "The request ran past the server's request_timeout_s; its generation was cancelled",
}
_HEADERS = {
    401: {"www-authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {"retry-after": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}


def documented(*statuses: int) -> dict[int, dict]:
    """FastAPI's ``responses=`` for the error statuses a route answers: OpenAI's error body, what the status means
    here, and the headers that come with it."""
    return {s: {"model": ErrorResponse, "description": MEANING[s], "headers": _HEADERS.get(s, {})} for s in statuses}


class TooLarge(RequestError):
    """A request larger than the app's ``max_body_bytes``: 413 (gRPC: RESOURCE_EXHAUSTED, its code for a message too
    large); ``too_large`` words it as the HTTP guard does."""


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request body is larger than this server's limit of {limit} bytes")


class ModelNotFound(LookupError):
    """The request names a model this server does not serve: 404."""


class Unauthorized(PermissionError):
    """No or a wrong API key: 401."""


class Forbidden(PermissionError):
    """A gRPC client from another machine while the config refuses them: 403."""


class Overloaded(RuntimeError):
    """Every pool that could serve the request is full: 503 with ``retry-after`` (seconds until it likely is not)."""

    def __init__(self, message: str, retry_after_s: float = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = max(RETRY_AFTER_S, math.ceil(retry_after_s))


class ShuttingDown(RuntimeError):
    """The app is draining before it stops (``dynpart serve``'s Ctrl-C): 503; retry against another server."""


class RequestTimeout(TimeoutError):
    """The request ran past the app's ``request_timeout_s``; its generation was cancelled: 504."""


@dataclass(frozen=True)
class ApiError:
    status: int
    kind: str  # OpenAI's error ``type``
    grpc_code: grpc.StatusCode
    message: str
    code: str | None = None  # OpenAI's error ``code``
    param: str | None = None
    retry_after_s: int = RETRY_AFTER_S  # sent with every 503

    @property
    def retry(self) -> bool:
        return self.status == 503

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(self.retry_after_s)} if self.retry else {}
        if self.status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(error_body(self.message, self.kind, self.code, self.param), status_code=self.status,
                            headers=headers or None)

    def to_grpc(self, ctx) -> None:
        ctx.set_code(self.grpc_code)
        ctx.set_details(self.message)
        if self.retry:
            ctx.set_trailing_metadata([("retry-after", str(self.retry_after_s))])


def cause_of(e: BaseException) -> BaseException:
    """The exception raised inside a replica (Ray wraps it in a ``RayTaskError``), or ``e`` itself."""
    from ray.exceptions import RayTaskError

    return e.cause if isinstance(e, RayTaskError) and e.cause is not None else e


def api_error(e: BaseException) -> ApiError:
    """The ``ApiError`` of an exception raised here or inside a replica."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    cause = cause_of(e)
    if isinstance(cause, ModelNotFound):
        return ApiError(404, "not_found_error", grpc.StatusCode.NOT_FOUND, str(cause), code="model_not_found")
    if isinstance(cause, Unauthorized):
        return ApiError(401, "invalid_request_error", grpc.StatusCode.UNAUTHENTICATED, str(cause),
                        code="invalid_api_key")
    if isinstance(cause, Forbidden):
        return ApiError(403, "permission_error", grpc.StatusCode.PERMISSION_DENIED, str(cause))
    if isinstance(cause, ValidationError):
        loc, message = validation_message(cause.errors())
        return ApiError(400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT, message, param=loc)
    if isinstance(cause, TooLarge):
        return ApiError(413, "invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause),
                        code="request_too_large")
    if isinstance(cause, RequestError):  # only the client's mistakes: a bare ValueError is a bug here (500)
        return ApiError(400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT, _first_line(cause),
                        param=cause.param)
    if isinstance(cause, Overloaded):
        return ApiError(503, "overloaded_error", grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause),
                        retry_after_s=cause.retry_after_s)
    if isinstance(cause, ShuttingDown):
        return ApiError(503, "unavailable_error", grpc.StatusCode.UNAVAILABLE, str(cause),
                        retry_after_s=RETRY_AFTER_S)
    if isinstance(cause, BackPressureError):
        return ApiError(503, "overloaded_error", grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "the pool's request queue is full; retry later")
    if isinstance(cause, RequestTimeout):
        return ApiError(504, "timeout_error", grpc.StatusCode.DEADLINE_EXCEEDED, str(cause))
    if isinstance(cause, (EngineFailed, RayActorError)):  # the replica is being replaced: retrying is right
        return ApiError(503, "unavailable_error", grpc.StatusCode.UNAVAILABLE,
                        f"the engine replica serving this request failed and is being replaced; retry: "
                        f"{_first_line(cause)}")
    return ApiError(500, "server_error", grpc.StatusCode.INTERNAL,
                    f"internal error: {type(cause).__name__}: {_first_line(cause)}")


def error_response(e: BaseException) -> JSONResponse:
    return api_error(e).response()


# Type-mismatch errors of one member of a union (``stop`` as a string when a list was sent): reported only when no
# error says more, so ``stop: List should have at most 4 items`` wins over ``stop: Input should be a valid string``.
def validation_message(errors: list[dict], required: Sequence[str] = ()) -> tuple[str | None, str]:
    """``(field, "field: what is wrong")`` of pydantic's errors, preferring a broken limit over a type mismatch. A
    missing field is named (``missing required field 'model'``); ``required`` are the body's required fields, named
    when the whole body is missing."""
    if not errors:
        return None, "invalid request"
    err = next((x for x in errors if not str(x.get("type", "")).endswith("_type")), errors[0])
    where = _path(err)
    if err.get("type") == "missing" and where is None:
        fields = ", ".join(repr(f) for f in required)
        return (required[0] if required else None,
                "the request body is empty: send a JSON object" + (f" with {fields}" if fields else ""))
    if err.get("type") == "missing":
        missing = [p for p in (_path(x) for x in errors if x.get("type") == "missing") if p]
        plural = "s" if len(missing) > 1 else ""
        return where, f"missing required field{plural} " + ", ".join(repr(p) for p in missing)
    if err.get("type") == "json_invalid":
        return None, f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
    if err.get("type") == "model_attributes_type" and where is None and isinstance(err.get("input"), bytes):
        return "content-type", "the request body was not read as JSON: send it with 'content-type: application/json'"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return where, f"{where}: {msg}" if where else msg


def _path(err: dict) -> str | None:
    """The field an error is about, ``messages.0.content``; None for the body itself."""
    return ".".join(str(x) for x in err.get("loc", ()) if x != "body" and _is_field(x)) or None


def _is_field(x) -> bool:
    """Path parts that name a field or an index, not a union member's type tag (``str``, ``list[int]``, ...)."""
    return isinstance(x, int) or (x.isidentifier() and x not in ("str", "int", "float", "bool", "list", "dict"))


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
