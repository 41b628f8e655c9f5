"""Kubernetes Secrets for MinIO's root user and the three S3 identities, generated at deploy time.

No credential is ever written into the repository: ``k8s/minio`` only *references* these Secrets, and this
module makes fresh random ones when the cluster is set up::

    python -m storage.k8s_secrets | kubectl apply -f -
    python -m storage.k8s_secrets --namespace tocoad --endpoint http://minio.tocoad.svc:9000 | kubectl apply -f -

Secrets made:

- ``tocoad-minio-root``: ``MINIO_ROOT_USER`` / ``MINIO_ROOT_PASSWORD`` for the MinIO StatefulSet and the
  setup Job.
- ``tocoad-s3-<identity>`` for each identity of :data:`storage.identities.IDENTITIES`: ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``TOCOAD_S3_ENDPOINT`` and ``TOCOAD_S3_REGION``. The predictor's Secret also
  carries the KServe ``serving.kserve.io/s3-*`` annotations, so a ServiceAccount listing it can pull models.

Re-applying replaces the credentials; re-run the ``tocoad-minio-setup`` Job afterwards so MinIO's users
follow (and restart MinIO if the root credentials changed).
"""

from __future__ import annotations

import argparse
import secrets
import string
from typing import Any
from urllib.parse import urlsplit

import yaml

from storage.identities import IDENTITIES

ROOT_SECRET = "tocoad-minio-root"
SECRET_PREFIX = "tocoad-s3-"
REGION = "us-east-1"
DEFAULT_NAMESPACE = "tocoad"
DEFAULT_ENDPOINT = "http://minio.tocoad.svc:9000"
ACCESS_KEY_LENGTH = 20
SECRET_KEY_LENGTH = 40
_ACCESS_KEY_ALPHABET = string.ascii_uppercase + string.digits


def _access_key() -> str:
    """A random access key: ``ACCESS_KEY_LENGTH`` characters of ``[A-Z0-9]``."""
    return "".join(secrets.choice(_ACCESS_KEY_ALPHABET) for _ in range(ACCESS_KEY_LENGTH))


def _secret_key() -> str:
    """A random secret key: ``SECRET_KEY_LENGTH`` URL-safe characters (240 bits)."""
    return secrets.token_urlsafe(SECRET_KEY_LENGTH * 3 // 4)[:SECRET_KEY_LENGTH]


def generate_credentials() -> dict[str, tuple[str, str]]:
    """Fresh random ``{identity: (access_key, secret_key)}`` for every identity in ``IDENTITIES``."""
    credentials: dict[str, tuple[str, str]] = {}
    used: set[str] = set()
    for name in IDENTITIES:
        pair = (_access_key(), _secret_key())
        while used & set(pair):  # astronomically unlikely; keeps every value distinct
            pair = (_access_key(), _secret_key())
        used.update(pair)
        credentials[name] = pair
    return credentials


def _kserve_annotations(endpoint: str) -> dict[str, str]:
    """The KServe S3 annotations for ``endpoint`` (``http://host:port`` or ``https://host:port``)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"S3 endpoint must be an http:// or https:// URL with a host, got {endpoint!r}")
    return {
        "serving.kserve.io/s3-endpoint": parts.netloc,
        "serving.kserve.io/s3-usehttps": "1" if parts.scheme == "https" else "0",
        "serving.kserve.io/s3-region": REGION,
        "serving.kserve.io/s3-useanoncredential": "false",
    }


def _secret(
    name: str, namespace: str, data: dict[str, str], annotations: dict[str, str] | None = None
) -> dict:
    """An ``Opaque`` Secret manifest carrying ``data`` as ``stringData``."""
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "tocoad", "app.kubernetes.io/component": "s3-credentials"},
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "stringData": data}


def secret_manifests(
    namespace: str = DEFAULT_NAMESPACE,
    endpoint: str = DEFAULT_ENDPOINT,
    credentials: dict[str, tuple[str, str]] | None = None,
    root: tuple[str, str] | None = None,
) -> list[dict]:
    """The root Secret and one ``tocoad-s3-<identity>`` Secret per identity, as Kubernetes manifests.

    ``credentials`` (``{identity: (access_key, secret_key)}``, all identities) and ``root`` (``(user,
    password)``) default to fresh random values from :func:`generate_credentials`.
    """
    if credentials is None:
        credentials = generate_credentials()
    if set(credentials) != set(IDENTITIES):
        raise ValueError(f"credentials must cover exactly {sorted(IDENTITIES)}, got {sorted(credentials)}")
    if root is None:
        root = (_access_key(), _secret_key())
    kserve = _kserve_annotations(endpoint)
    manifests = [
        _secret(ROOT_SECRET, namespace, {"MINIO_ROOT_USER": root[0], "MINIO_ROOT_PASSWORD": root[1]}),
    ]
    for name in IDENTITIES:
        access, secret = credentials[name]
        data = {
            "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret,
            "TOCOAD_S3_ENDPOINT": endpoint,
            "TOCOAD_S3_REGION": REGION,
        }
        annotations = kserve if name == "predictor" else None
        manifests.append(_secret(f"{SECRET_PREFIX}{name}", namespace, data, annotations))
    return manifests


def render_yaml(manifests: list[dict]) -> str:
    """``manifests`` as one multi-document YAML stream (``---`` before each document)."""
    return yaml.safe_dump_all(manifests, explicit_start=True, sort_keys=False, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    """Print fresh Secrets as YAML, for ``| kubectl apply -f -``."""
    parser = argparse.ArgumentParser(
        prog="python -m storage.k8s_secrets", description="Print fresh tocoad S3 Secrets as YAML."
    )
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="namespace of the Secrets (default: tocoad)"
    )
    parser.add_argument(
        "--endpoint",
        default=None,
        help="S3 endpoint URL put in the Secrets (default: http://minio.<namespace>.svc:9000)",
    )
    args = parser.parse_args(argv)
    endpoint = args.endpoint or f"http://minio.{args.namespace}.svc:9000"
    print(render_yaml(secret_manifests(namespace=args.namespace, endpoint=endpoint)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
