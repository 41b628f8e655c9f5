"""One error body for every refusal, ``{"error": "..."}``, and one log line per client error (no traceback).

KServe's own handlers log every 4xx with a full traceback at ERROR level, and FastAPI answers a malformed V2
body with 422 and the input echoed back; the handlers here replace both. Only unexpected exceptions (HTTP 500)
keep KServe's handler and its traceback.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady, UnsupportedProtocol
from starlette.exceptions import HTTPException

log = logging.getLogger("tocoad.serving")
MAX_MESSAGE_CHARS = 500
_LONG_WORD = re.compile(r"\S{81,}")
_STATUS = {InvalidInput: 400, ModelNotFound: 404, ModelNotReady: 503, ServerNotReady: 503,
           NotImplementedError: 501, UnsupportedProtocol: 501}  # fmt: skip


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}`` with ``status``; a long word (an echoed name or data) is cut to 80 characters and
    the message to 500."""
    message = _LONG_WORD.sub(lambda m: m.group()[:77] + "...", message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return JSONResponse({"error": message}, status, headers)


def refuse(
    method: str, path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Log one line for a refused request and answer it."""
    log.info("%s %s refused with %d: %s", method, path[:200], status, message[:MAX_MESSAGE_CHARS])
    return error_response(status, message, headers)


def _validation_message(exc: RequestValidationError) -> str:
    """Where and what, for the first three problems; never the input itself."""
    problems = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg', 'invalid')}"
                for e in exc.errors()[:3]]  # fmt: skip
    return "invalid V2 inference request: " + "; ".join(p[:120] for p in problems)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        status, message = 400, _validation_message(exc)
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
    else:
        status = next(code for kind, code in _STATUS.items() if isinstance(exc, kind))
        message = str(exc)
    return refuse(request.method, request.url.path, status, message, getattr(exc, "headers", None))


def add_error_handlers(app: FastAPI) -> None:
    """Install the handlers (after KServe's, which they replace) for every client-side error."""
    for kind in (*_STATUS, RequestValidationError, HTTPException):
        app.add_exception_handler(kind, _handle)
