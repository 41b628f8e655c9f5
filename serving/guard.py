"""The predictor's outer ASGI layer: request size limits, model-version routes and the error counter.

* The request head (path and headers) is limited to ``max_header_bytes`` (431); uvicorn's h11 parser bounds
  what it buffers before that (see :mod:`serving.server`).
* The body is counted while it streams, whatever its framing (``Content-Length`` or chunked), and the request is
  refused with 413 as soon as it passes ``max_body_bytes``; the connection is then closed, so the rest is never
  read. A declared ``Content-Length`` above the limit is refused before any byte is read.
* ``/v2/models/<name>/versions/<version>[/infer|/ready]`` is served for the loaded version and answers 404 for
  any other.
* Every 4xx/5xx on a model route is counted once in ``tocoad_request_errors_total`` by kind; the control
  routes (reload, load, unload) are not counted.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serving.errors import refuse
from serving.inputs import short
from serving.predictor import ERROR_KIND

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_VERSION_ROUTE = re.compile(r"/v2/models/([^/]+)/versions/([^/]+)(/infer|/ready)?")
_DEFAULT_KIND = {
    404: "unknown_model",
    413: "too_large",
    431: "too_large",
    501: "bad_request",
    503: "not_ready",
}
_CLOSE = {"Connection": "close"}


class Refusal(Exception):
    """A request the guard answers itself: ``status``, message, error kind and extra headers."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers


class _ClientGone(Exception):
    """The client disconnected before its body was complete."""


def _head_bytes(scope: Scope) -> int:
    return (
        len(scope.get("raw_path") or b"")
        + len(scope.get("query_string") or b"")
        + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
    )


def _check_head(scope: Scope, max_header: int, max_body: int) -> None:
    size = _head_bytes(scope)
    if size > max_header:
        raise Refusal(431, f"request headers of {size} bytes are above the {max_header}-byte limit", "too_large",
                      _CLOSE)  # fmt: skip
    length = dict(scope.get("headers", ())).get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body):
        raise Refusal(
            413, f"the declared request body is above the {max_body}-byte limit", "too_large", _CLOSE
        )


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, counted chunk by chunk; :class:`Refusal` (413) as soon as it passes ``limit``."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refusal(413, f"request body is above the {limit}-byte limit", "too_large", _CLOSE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the read body over once, then defers to the server's."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class Guard:
    """Pure ASGI middleware in front of KServe's routes (see the module notes)."""

    def __init__(self, app: ASGIApp, predictor: Any):
        self.app, self.predictor = app, predictor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.predictor.settings
        try:
            _check_head(scope, settings.max_header_bytes, settings.max_body_bytes)
            body = await _read_body(receive, settings.max_body_bytes)
            scope = self._route(scope)
        except _ClientGone:
            return None
        except Refusal as exc:
            self._count(exc.kind)
            response = refuse(scope["method"], scope["path"], exc.status, str(exc), exc.headers)
            return await response(scope, receive, send)
        await self._call(scope, _replay(body, receive), send)

    def _route(self, scope: Scope) -> Scope:
        """Serve a version route as the plain model route when it names the loaded version; else 404."""
        match = _VERSION_ROUTE.fullmatch(scope["path"])
        if match is None:
            return scope
        name, version, rest = match.groups()
        loaded = self.predictor.current
        if name != self.predictor.name or loaded is None or version != loaded.version:
            served = f"{self.predictor.name} version {loaded.version}" if loaded else "no model"
            raise Refusal(404, f"model {short(name)} version {short(version)} is not served here ({served})",
                          "unknown_model")  # fmt: skip
        path = f"/v2/models/{name}{rest or ''}"
        return {**scope, "path": path, "raw_path": path.encode()}

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        holder: dict[str, str] = {}
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        token = ERROR_KIND.set(holder)
        try:
            await self.app(scope, receive, send_status)
        finally:
            ERROR_KIND.reset(token)
            code, path = status[0], scope["path"]
            if code >= 400 and "/models/" in path and not path.endswith(("/reload", "/load", "/unload")):
                fallback = "internal" if code >= 500 else "bad_request"
                self._count(holder.get("kind") or _DEFAULT_KIND.get(code, fallback))

    def _count(self, kind: str) -> None:
        self.predictor.metrics.errors.labels(self.predictor.name, kind).inc()
