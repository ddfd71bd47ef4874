"""The HTTP front door, before any body is parsed: the API key, the content type and the body size.

A pure ASGI middleware, not Starlette's ``BaseHTTPMiddleware`` (which wraps streamed answers and would hide a client's
disconnect from the generation it must cancel). The body is read up to ``max_body_bytes`` and replayed to the app;
after it, ``receive`` is the client's own, so a disconnect still reaches the streaming response. The limits are the
app's config, put on ``api.state.guard`` by the ingress when it starts. ``/health`` needs no key (probes).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote

import grpc

from app.serve.errors import ApiError, Forbidden, Unauthorized, api_error, too_large


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    api_key: str | None = None


def check_key(api_key: str | None, authorization: str | None) -> None:
    """Raise ``Unauthorized`` unless ``authorization`` is ``Bearer <api_key>`` (or no key is configured)."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise Unauthorized("missing or invalid API key: send the header 'Authorization: Bearer <key>'")


def check_peer(peer: str, remote_allowed: bool) -> None:
    """Refuse a gRPC client on another machine unless the config allows them. Ray 2.60's gRPC proxy listens on
    every interface (it has no host option), so this is what keeps gRPC as local as HTTP's 127.0.0.1 by default."""
    if remote_allowed or peer.startswith("unix:"):
        return
    host = unquote(peer).partition(":")[2].rpartition(":")[0].strip("[]")  # ipv4:127.0.0.1:5000, ipv6:[::1]:5000
    try:
        ip = ipaddress.ip_address(host)
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # [::ffff:127.0.0.1], dual-stack
        local = (mapped or ip).is_loopback
    except ValueError:
        local = False
    if not local:
        raise Forbidden(f"gRPC clients from other machines are refused ({peer}): set grpc_remote_clients in the "
                        "app's config (with an api_key) to allow them")


def _json_type(content_type: str) -> bool:
    mime = content_type.split(";")[0].strip().lower()
    return mime == "application/json" or mime.endswith("+json")


class Guard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].rstrip("/").endswith("/health"):
            return await self.app(scope, receive, send)
        limits: Limits = scope["app"].state.guard
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            check_key(limits.api_key, headers.get("authorization"))
        except Unauthorized as e:
            return await api_error(e).response()(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if "content-type" in headers and not _json_type(headers["content-type"]):
            return await ApiError(415, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT, "content-type must be application/json, "
                                  f"not {headers['content-type'][:64]!r}", param="content-type"
                                  ).response()(scope, receive, send)
        over = api_error(too_large(limits.max_body_bytes))  # 413, worded as gRPC's RESOURCE_EXHAUSTED
        if int(headers.get("content-length") or 0) > limits.max_body_bytes:
            return await over.response()(scope, receive, send)
        body, more = b"", True
        while more:  # a body without content-length (chunked) is counted as it arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limits.max_body_bytes:
                return await over.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
