"""Where the S3 store is and who we are there: read from the environment, never from code.

Variables (the ``AWS_*``/``S3_*`` spellings are what KServe and most S3 tools use, so a cluster Secret works as is):

============================  ==================================  =====================================
``TOCOAD_S3_ENDPOINT``        ``S3_ENDPOINT``, ``AWS_ENDPOINT_URL``  ``http(s)://host:port``; unset = local server
``TOCOAD_S3_ACCESS_KEY``      ``AWS_ACCESS_KEY_ID``
``TOCOAD_S3_SECRET_KEY``      ``AWS_SECRET_ACCESS_KEY``
``TOCOAD_S3_REGION``          ``AWS_REGION``                        default ``us-east-1``
``TOCOAD_S3_CA_BUNDLE``       ``AWS_CA_BUNDLE``                     PEM file to trust for TLS
``TOCOAD_S3_ROLE``                                                  local server identity: admin|predictor|uploader
``TOCOAD_S3_RETRIES``                                               attempts on connection errors and 5xx (5)
``TOCOAD_MODELS_BUCKET``                                            default ``models``
``TOCOAD_DATASETS_BUCKET``                                          default ``datasets``
``TOCOAD_HOME``                                                     local server and cache home
============================  ==================================  =====================================

With no endpoint set, commands use the embedded local S3 server (:mod:`storage.local_server`), starting it when
needed, with the credentials of ``TOCOAD_S3_ROLE`` (admin by default) from its private credentials file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from storage.identities import DATASETS_BUCKET, IDENTITIES, MODELS_BUCKET


class StorageConfigError(ValueError):
    """The storage settings are incomplete or malformed; the message says which variable to set."""


def _env(*names: str, default: str | None = None) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return default


def tocoad_home() -> Path:
    """The user's tocoad data home: ``$TOCOAD_HOME`` or ``$XDG_DATA_HOME/tocoad`` (``~/.local/share/tocoad``)."""
    if home := os.environ.get("TOCOAD_HOME"):
        return Path(home)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tocoad"


@dataclass(frozen=True)
class StorageSettings:
    """Connection settings for one S3 identity."""

    endpoint: str  # host:port
    access_key: str
    secret_key: str = field(repr=False)
    secure: bool = False
    region: str = "us-east-1"
    ca_bundle: str | None = None
    retries: int = 5
    models_bucket: str = MODELS_BUCKET
    datasets_bucket: str = DATASETS_BUCKET
    local: bool = False  # the embedded server

    @property
    def url(self) -> str:
        """The endpoint as a URL."""
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"


def parse_endpoint(value: str) -> tuple[str, bool]:
    """``http(s)://host:port`` (or bare ``host:port``, taken as https) -> (host:port, secure)."""
    parsed = urlparse(value if "://" in value else f"https://{value}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise StorageConfigError(f"S3 endpoint {value!r} is not a URL like http://host:9000 or https://host")
    if parsed.path not in ("", "/"):
        raise StorageConfigError(f"S3 endpoint {value!r} must not have a path")
    host = parsed.hostname if parsed.port is None else f"{parsed.hostname}:{parsed.port}"
    return host, parsed.scheme == "https"


def resolve_settings(role: str | None = None, start_local: bool = True) -> StorageSettings:
    """Settings from the environment, or from the local server (started when ``start_local``) when none is set."""
    role = role or os.environ.get("TOCOAD_S3_ROLE") or "admin"
    if role not in IDENTITIES:
        raise StorageConfigError(f"TOCOAD_S3_ROLE={role!r}: choose one of {', '.join(IDENTITIES)}")
    try:
        retries = int(os.environ.get("TOCOAD_S3_RETRIES", "5"))
    except ValueError:
        raise StorageConfigError("TOCOAD_S3_RETRIES must be an integer") from None
    common = {
        "region": _env("TOCOAD_S3_REGION", "AWS_REGION", default="us-east-1"),
        "retries": max(1, retries),
        "models_bucket": os.environ.get("TOCOAD_MODELS_BUCKET", MODELS_BUCKET),
        "datasets_bucket": os.environ.get("TOCOAD_DATASETS_BUCKET", DATASETS_BUCKET),
    }
    endpoint = _env("TOCOAD_S3_ENDPOINT", "S3_ENDPOINT", "AWS_ENDPOINT_URL")
    if endpoint:
        host, secure = parse_endpoint(endpoint)
        access = _env("TOCOAD_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        secret = _env("TOCOAD_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise StorageConfigError(
                f"S3 endpoint {endpoint} is set but credentials are not: set TOCOAD_S3_ACCESS_KEY and "
                "TOCOAD_S3_SECRET_KEY (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        ca = _env("TOCOAD_S3_CA_BUNDLE", "AWS_CA_BUNDLE")
        if ca and not Path(ca).is_file():
            raise StorageConfigError(f"TOCOAD_S3_CA_BUNDLE={ca} does not exist")
        return StorageSettings(host, access, secret, secure=secure, ca_bundle=ca, **common)
    from storage.local_server import LocalS3

    server = LocalS3()
    info = server.up() if start_local else server.status()
    if info is None:
        raise StorageConfigError(
            "no S3 endpoint is configured and the local server is not running: run `tocoad storage up` "
            "or set TOCOAD_S3_ENDPOINT"
        )
    access, secret = server.credentials()[role]
    return StorageSettings(info["endpoint"], access, secret, local=True, **common)
