"""The three S3 identities and what each may do: one source for the local server and for MinIO in ``k8s/``.

- ``admin``: the flows and operators; everything in the ``models`` and ``datasets`` buckets.
- ``predictor``: the inference server; read and list ``models`` only.
- ``uploader``: cameras and uploaders; write objects into ``datasets`` only (no read, no list, no delete).

The narrow identities get the same policy document on both servers: MinIO reads it from ``k8s/minio``, the local
SeaweedFS server from its ``s3.json`` (``policies`` plus ``policyNames``), where an attached policy is authoritative
and tells ``s3:PutObject`` from ``s3:DeleteObject``, which SeaweedFS's coarse ``Write`` action cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MODELS_BUCKET = "models"
DATASETS_BUCKET = "datasets"
BUCKETS = (MODELS_BUCKET, DATASETS_BUCKET)


@dataclass(frozen=True)
class Identity:
    """One S3 identity: which buckets it may read (get + list) and which it may write (put)."""

    name: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    admin: bool = False


IDENTITIES: dict[str, Identity] = {
    "admin": Identity("admin", read=BUCKETS, write=BUCKETS, admin=True),
    "predictor": Identity("predictor", read=(MODELS_BUCKET,)),
    "uploader": Identity("uploader", write=(DATASETS_BUCKET,)),
}


SEAWEEDFS_ADMIN_ACTIONS = ["Admin", "Read", "List", "Tagging", "Write"]


def seaweedfs_identity(name: str, access: str, secret: str) -> dict[str, Any]:
    """One SeaweedFS ``s3.json`` identity: admin by action, the others by their attached MinIO policy."""
    doc: dict[str, Any] = {"name": name, "credentials": [{"accessKey": access, "secretKey": secret}]}
    if IDENTITIES[name].admin:
        return {**doc, "actions": SEAWEEDFS_ADMIN_ACTIONS}
    return {**doc, "actions": [], "policyNames": [name]}


def seaweedfs_config(credentials: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The SeaweedFS ``-s3.config`` document for ``{identity: (access_key, secret_key)}``."""
    return {
        "identities": [seaweedfs_identity(name, *keys) for name, keys in credentials.items()],
        "policies": [
            {"name": name, "content": json.dumps(minio_policy(IDENTITIES[name]))}
            for name in credentials
            if not IDENTITIES[name].admin
        ],
    }


def minio_policy(identity: Identity) -> dict[str, Any]:
    """The MinIO (AWS IAM) policy document for an identity, as mounted by ``k8s/minio``."""
    statements: list[dict[str, Any]] = []
    if identity.admin:
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:*"],
                "Resource": [f"arn:aws:s3:::{b}" for b in BUCKETS] + [f"arn:aws:s3:::{b}/*" for b in BUCKETS],
            }
        )
        return {"Version": "2012-10-17", "Statement": statements}
    if identity.read:
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                "Resource": [f"arn:aws:s3:::{b}" for b in identity.read],
            }
        )
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{b}/*" for b in identity.read],
            }
        )
    if identity.write:
        objects = [f"arn:aws:s3:::{b}/*" for b in identity.write]
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                "Resource": objects,
            }
        )
        # write-once: what a narrow identity wrote stays (an overwrite cannot be denied by policy; see README)
        statements.append(
            {"Effect": "Deny", "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"], "Resource": objects}
        )
    return {"Version": "2012-10-17", "Statement": statements}
