"""Who may reload, load and unload the predictor, and what a reload may name.

The control endpoints need ``Authorization: Bearer <token>``, where the token is the content of the file named
by ``TOCOAD_SERVE_CONTROL_TOKEN_FILE`` (a mounted Kubernetes Secret, say), re-read on every call so a rotated
Secret takes effect. Without such a file, or with a token shorter than 16 characters, the endpoints are off.
A reload may name only the model the server was started for: the same URI, or, for a registry model
``s3://<bucket>/<name>/<ref>``, another version or alias of ``<name>`` in that bucket.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path
from typing import Any

TOKEN_FILE_ENV = "TOCOAD_SERVE_CONTROL_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a version or alias; no "/", "..", or "_aliases"


class ControlRefused(Exception):
    """A control call that is refused with ``status`` (401, 403 or 400) and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_token(path: str) -> str | None:
    """The token in ``path`` (surrounding whitespace dropped); None when unset, unreadable or too short."""
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token if len(token) >= MIN_TOKEN_CHARS else None


def check_token(token_file: str, authorization: str | None) -> None:
    """Raise :class:`ControlRefused` unless ``authorization`` carries the configured bearer token."""
    token = read_token(token_file)
    if token is None:
        raise ControlRefused(
            403,
            f"control endpoints are off: set {TOKEN_FILE_ENV} to a readable file holding a token of at least "
            f"{MIN_TOKEN_CHARS} characters",
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ControlRefused(401, "send the control token as Authorization: Bearer <token>")


def reload_target(origin: str, body: Any) -> str | None:
    """The URI a reload request names (None: reload the current one), if the server may load it."""
    if body is None or body == {}:
        return None
    if not isinstance(body, dict) or set(body) - {"storage_uri", "version"} or len(body) > 1:
        raise ControlRefused(400, 'the body is {"storage_uri": "s3://..."} or {"version": "<version|alias>"}')
    if body.get("storage_uri") == origin:
        return origin
    parts = origin[5:].split("/") if origin.startswith("s3://") else []
    if len(parts) != 3:
        raise ControlRefused(
            403, f"this server serves the bundle at {origin}: a reload re-reads it, nothing else"
        )
    bucket, name, _ = parts
    ref = body.get("version")
    uri = body.get("storage_uri")
    if isinstance(uri, str) and uri.startswith(f"s3://{bucket}/{name}/"):
        ref = uri.removeprefix(f"s3://{bucket}/{name}/")
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        raise ControlRefused(
            403, f"this server serves {name}: a reload names s3://{bucket}/{name}/<version|alias>"
        )
    return f"s3://{bucket}/{name}/{ref}"


def control_headers(token_file: str | None = None) -> dict[str, str]:
    """The Authorization header a client (the flow's deploy step) sends, from the token file (default: the
    ``TOCOAD_SERVE_CONTROL_TOKEN_FILE`` variable); empty when there is no usable token."""
    token = read_token(token_file if token_file is not None else os.environ.get(TOKEN_FILE_ENV, ""))
    return {"Authorization": f"Bearer {token}"} if token else {}
