"""Who may reload, load and unload the predictor, and what a reload may name.

The control endpoints need ``Authorization: Bearer <token>``, where the token is the content of the file named
by ``TOCOAD_SERVE_CONTROL_TOKEN_FILE`` (a mounted Kubernetes Secret, say), re-read on every call so a rotated
Secret takes effect. Without such a file, or with a token shorter than 16 characters, the endpoints are off.
A reload may name only the model the server was started for: the same URI, or, for a registry model
``s3://<bucket>/<name>/<ref>``, another version or alias of ``<name>`` in that bucket. A server that follows an
alias keeps following it: a reload that names a version is refused (409) unless it says ``"pin": true``; a reload
that names an alias follows that alias again.
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
    """A control call that is refused with ``status`` (401, 403, 400 or 409) and a message."""

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


def follows(uri: str) -> str:
    """The registry alias a URI follows (``s3://<bucket>/<name>/<alias>``); empty for a version or a folder."""
    if not uri.startswith("s3://"):
        return ""
    from storage.registry import ALIASES

    ref = uri.rsplit("/", 1)[-1]
    return ref if ref in ALIASES else ""


def reload_target(origin: str, body: Any, current: str = "") -> str | None:
    """The URI a reload request names (None: reload the current one), if the server may load it. While the server
    follows an alias (``current`` is its URI), a version is loaded only with ``"pin": true``."""
    if body is None or body == {}:
        return None
    usage = (
        'the body is {"storage_uri": "s3://..."} or {"version": "<version|alias>"}, with optional "pin": true'
    )
    if (
        not isinstance(body, dict)
        or set(body) - {"storage_uri", "version", "pin"}
        or len(body) - ("pin" in body) != 1
        or not isinstance(body.get("pin", False), bool)
    ):
        raise ControlRefused(400, usage)
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
    target = f"s3://{bucket}/{name}/{ref}"
    alias = follows(current)
    if alias and not follows(target) and body.get("pin") is not True:
        raise ControlRefused(
            409,
            f"this server follows {name}'s {alias} alias: promote or roll back in the registry, reload "
            f'{{"version": "{alias}"}}, or pin this version with {{"version": "{ref}", "pin": true}}',
        )
    return target


def control_headers(token_file: str | None = None) -> dict[str, str]:
    """The Authorization header a client (the flow's deploy step) sends, from the token file (default: the
    ``TOCOAD_SERVE_CONTROL_TOKEN_FILE`` variable); empty when there is no usable token."""
    token = read_token(token_file if token_file is not None else os.environ.get(TOKEN_FILE_ENV, ""))
    return {"Authorization": f"Bearer {token}"} if token else {}
