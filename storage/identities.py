"""The three S3 identities and what each may do: one source for the local server and for MinIO in ``k8s/``.

- ``admin``: the flows and operators; everything in the ``models`` and ``datasets`` buckets.
- ``predictor``: the inference server; read and list ``models`` only.
- ``uploader``: cameras and uploaders; write objects into ``datasets`` only (no read, no list).
"""

from __future__ import annotations

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


def seaweedfs_actions(identity: Identity) -> list[str]:
    """SeaweedFS ``s3.json`` actions for an identity (``Write`` there also covers delete)."""
    if identity.admin:
        return ["Admin", "Read", "List", "Tagging", "Write"]
    actions = [f"{verb}:{b}" for b in identity.read for verb in ("Read", "List")]
    return actions + [f"Write:{b}" for b in identity.write]


def seaweedfs_config(credentials: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The SeaweedFS ``-s3.config`` document for ``{identity: (access_key, secret_key)}``."""
    return {
        "identities": [
            {
                "name": name,
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": seaweedfs_actions(IDENTITIES[name]),
            }
            for name, (access, secret) in credentials.items()
        ]
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
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                "Resource": [f"arn:aws:s3:::{b}/*" for b in identity.write],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}
