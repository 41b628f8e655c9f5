"""The model registry: versioned, checksummed model bundles under ``models/<name>/<version>/`` in S3.

- A version's ``manifest.json`` (the bundle's own, listing every file's sha256) is uploaded last: it is the commit
  marker. A version without it was cut off; it is never listed, loaded or promoted, and registering the same
  bundle again resumes it (files already there with the right sha256 are skipped).
- Aliases (``production``, ``candidate``) are small pointer objects under ``<name>/_aliases/``: a promote or
  rollback is one PUT, so a reader sees the old or the new version, never a mix.
- Every alias change is also written to ``<name>/_history/`` (who, when, why, the metrics at the time).
- :meth:`ModelRegistry.prune` keeps the newest N versions and every version an alias points to.
"""

from __future__ import annotations

import calendar
import getpass
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleSignatureError,
    read_manifest,
    verify_bundle,
    verify_signature,
)
from storage.store import ArtifactStore, NotFound, sha256_bytes
from storage.trees import pull_tree, push_tree

ALIASES = ("production", "candidate")
_VERSION = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked; the message says why and what to do."""


def check_name(name: str, what: str = "model name") -> str:
    """Model and dataset names: lower-case letters, digits, ``.``, ``_`` and ``-``."""
    if not _NAME.match(name or ""):
        raise RegistryError(
            f"{what} {name!r} must be 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter/digit"
        )
    return name


def new_version(content_sha: str) -> str:
    """A sortable, unique version id: UTC time to the millisecond plus 8 hex digits of the content's hash."""
    now = time.time()
    return (
        f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}Z-{content_sha[:8]}"
    )


def version_time(version: str) -> float:
    """When a version id was made (Unix seconds, from its UTC timestamp)."""
    return float(calendar.timegm(time.strptime(version[:15], "%Y%m%dT%H%M%S")))


def prune_versions(
    store: ArtifactStore,
    bucket: str,
    name: str,
    doomed: list[str],
    partial: list[str],
    stale_after_s: float,
) -> list[str]:
    """Delete the ``doomed`` versions and the ``partial`` ones (cut-off uploads) older than ``stale_after_s``, each
    manifest first, then abort the incomplete multipart uploads under ``name/`` as old; return what was deleted."""
    now = time.time()
    doomed = doomed + [v for v in partial if now - version_time(v) > stale_after_s]
    for version in doomed:
        store.delete_prefix(bucket, f"{name}/{version}/", first=f"{name}/{version}/{MANIFEST}")
    store.abort_stale_uploads(bucket, f"{name}/", older_than_s=stale_after_s)
    return doomed


def actor() -> str:
    """Who is acting, for history entries: ``$TOCOAD_ACTOR`` or user@host."""
    if who := os.environ.get("TOCOAD_ACTOR"):
        return who
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class VersionInfo:
    """One committed model version."""

    name: str
    version: str
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics recorded in the bundle's manifest."""
        return self.manifest.get("metrics", {})


class ModelRegistry:
    """Register, list, pull, promote and roll back model bundles in the ``models`` bucket."""

    def __init__(self, store: ArtifactStore | None = None):
        self.store = store or ArtifactStore()
        self.bucket = self.store.settings.models_bucket

    def uri(self, name: str, version: str) -> str:
        """A version's storage URI, as the predictor takes it."""
        return f"s3://{self.bucket}/{name}/{version}"

    # ------------------------------------------------------------------ reading
    def models(self) -> list[str]:
        """Names of the models that have objects in the registry."""
        return sorted(
            p.rstrip("/") for p in self.store.list(self.bucket, "", recursive=False) if p.endswith("/")
        )

    def versions(self, name: str) -> list[str]:
        """Committed versions of a model, oldest first (a version counts once its manifest is there)."""
        check_name(name)
        found = set()
        for key in self.store.list(self.bucket, f"{name}/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == MANIFEST and _VERSION.match(parts[1]):
                found.add(parts[1])
        return sorted(found)

    def _partial_versions(self, name: str) -> dict[str, set[str]]:
        """Versions with files but no manifest (cut-off uploads): ``{version: {file, ...}}``."""
        files: dict[str, set[str]] = {}
        for key in self.store.list(self.bucket, f"{name}/"):
            parts = key.split("/", 2)
            if len(parts) == 3 and _VERSION.match(parts[1]):
                files.setdefault(parts[1], set()).add(parts[2])
        return {v: f for v, f in files.items() if MANIFEST not in f}

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        """A committed version's manifest (checked against its recorded sha256)."""
        check_name(name)
        if not _VERSION.match(version):
            raise RegistryError(
                f"{version!r} is not a version id (like 20261130T120000.000Z-1a2b3c4d) nor an alias"
            )
        try:
            return json.loads(self.store.get_bytes(self.bucket, f"{name}/{version}/{MANIFEST}"))
        except NotFound:
            self.require(name)
            raise RegistryError(
                f"model {name} has no committed version {version}; see `tocoad models list {name}`"
            ) from None

    def alias(self, name: str, alias: str) -> dict[str, Any] | None:
        """The alias record (``version``, ``previous``, ``by``, ``at``, ``reason``, ``metrics``), or None."""
        check_name(name)
        if alias not in ALIASES:
            raise RegistryError(f"alias {alias!r}: choose one of {', '.join(ALIASES)}")
        try:
            return json.loads(self.store.get_bytes(self.bucket, f"{name}/_aliases/{alias}.json"))
        except NotFound:
            return None

    def require(self, name: str) -> list[str]:
        """The model's committed versions; a RegistryError that names the known models if it has none."""
        if versions := self.versions(name):
            return versions
        known = [m for m in self.models() if m != name]
        raise RegistryError(
            f"model {name} does not exist (no committed version); known models: {', '.join(known) or 'none'}"
        )

    def resolve(self, name: str, ref: str = "production") -> str:
        """A version id from a version id, an alias, or ``latest``."""
        if ref in ALIASES:
            record = self.alias(name, ref)
            if record is None:
                self.require(name)
                raise RegistryError(
                    f"model {name} has no {ref} version yet; promote one with `tocoad models promote`"
                )
            return record["version"]
        if ref == "latest":
            return self.require(name)[-1]
        return ref

    def info(self, name: str, ref: str = "production") -> VersionInfo:
        """Resolve ``ref`` and read that version's manifest."""
        version = self.resolve(name, ref)
        return VersionInfo(name, version, self.manifest(name, version))

    def history(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Alias changes, oldest first."""
        check_name(name)
        prefix = f"{name}/_history/" + (f"{alias}/" if alias else "")
        keys = sorted(self.store.list(self.bucket, prefix), key=lambda k: k.rsplit("/", 1)[-1])
        return [json.loads(self.store.get_bytes(self.bucket, k)) for k in keys]

    # ------------------------------------------------------------------ writing
    def register(
        self, name: str, bundle_dir: Path, alias: str | None = None, reason: str = "registered"
    ) -> VersionInfo:
        """Upload a local bundle as a new version (manifest last); resume a cut-off upload of the same bundle.

        Registering a bundle that is already committed returns that version (idempotent).
        """
        check_name(name)
        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir)  # push_bundle verifies every file before it uploads
        manifest_bytes = (bundle_dir / MANIFEST).read_bytes()
        digest = sha256_bytes(manifest_bytes)
        version = next((v for v in self.versions(name) if v.endswith(digest[:8])), None)
        if version is None:
            partial = [v for v in self._partial_versions(name) if v.endswith(digest[:8])]
            version = sorted(partial)[-1] if partial else new_version(digest)
            push_bundle(self.store, self.bucket, f"{name}/{version}", bundle_dir, resume=bool(partial))
        info = VersionInfo(name, version, manifest)
        if alias:
            self.set_alias(name, alias, version, reason=reason)
        return info

    def set_alias(
        self, name: str, alias: str, version: str, reason: str = "", metrics: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Point ``alias`` at a committed version (one atomic PUT) and record it in the history."""
        manifest = self.manifest(name, version)  # raises unless committed
        current = self.alias(name, alias)
        record = {
            "alias": alias,
            "version": version,
            "previous": current["version"] if current else None,
            "by": actor(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason,
            "metrics": metrics if metrics is not None else manifest.get("metrics", {}),
        }
        data = json.dumps(record, indent=2, default=str).encode()
        self.store.put_bytes(self.bucket, f"{name}/_aliases/{alias}.json", data)
        stamp = f"{time.time_ns():020d}"
        self.store.put_bytes(self.bucket, f"{name}/_history/{alias}/{stamp}-{version}.json", data)
        return record

    def promote(
        self, name: str, ref: str = "candidate", reason: str = "promoted", **kw: Any
    ) -> dict[str, Any]:
        """Make ``ref`` (a version or ``candidate``) the production version."""
        return self.set_alias(name, "production", self.resolve(name, ref), reason=reason, **kw)

    def rollback(self, name: str, to: str | None = None, reason: str = "rollback") -> dict[str, Any]:
        """Point production back at the version it replaced (or at ``to``)."""
        current = self.alias(name, "production")
        if current is None:
            raise RegistryError(f"model {name} has no production version to roll back")
        target = self.resolve(name, to) if to else current.get("previous")
        if not target:
            raise RegistryError(f"production of {name} has no earlier version; name one with --to VERSION")
        return self.set_alias(name, "production", target, reason=reason)

    def pull(self, name: str, ref: str = "production", dest: Path | None = None) -> Path:
        """Download a version into ``dest`` (default: the local cache), verifying every file; return the folder.

        The folder appears only when complete and verified; a cached copy is re-verified before reuse.
        """
        info = self.info(name, ref)
        if dest is None:
            from storage.settings import tocoad_home

            dest = tocoad_home() / "cache" / "models" / name / info.version
        dest = Path(dest)
        if dest.exists():
            try:
                if read_manifest(dest).get("files") == info.manifest.get("files"):
                    verify_bundle(dest)
                    return dest
            except BundleSignatureError:
                raise
            except ValueError:
                pass
            raise RegistryError(
                f"{dest} exists and is not {name} {info.version}; remove it or choose another --out"
            )
        return pull_bundle(self.store, self.bucket, f"{name}/{info.version}", dest, info.manifest)

    def prune(self, name: str, keep: int, stale_after_s: float = 24 * 3600) -> list[str]:
        """Delete all but the newest ``keep`` versions, never one an alias points to; drop stale partial uploads
        and abort stale incomplete multipart uploads.

        A version's manifest is deleted first, so a half-deleted version is never listed.
        """
        if keep < 1:
            raise RegistryError("keep must be at least 1")
        pinned = {rec["version"] for a in ALIASES if (rec := self.alias(name, a))}
        versions = self.versions(name)
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v not in pinned]
        return prune_versions(
            self.store, self.bucket, name, doomed, list(self._partial_versions(name)), stale_after_s
        )


def push_bundle(
    store: ArtifactStore, bucket: str, prefix: str, bundle_dir: Path, resume: bool = True
) -> dict:
    """Upload a verified local bundle under ``bucket/prefix``, its ``manifest.sig`` (if signed) just before its
    ``manifest.json`` (the commit marker, last)."""
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    push_tree(store, bucket, prefix, bundle_dir, manifest["files"], resume=resume)
    if (bundle_dir / SIGNATURE).is_file():
        store.put_bytes(bucket, f"{prefix}/{SIGNATURE}", (bundle_dir / SIGNATURE).read_bytes(), "text/plain")
    store.put_bytes(bucket, f"{prefix}/{MANIFEST}", (bundle_dir / MANIFEST).read_bytes())
    return manifest


def pull_bundle(
    store: ArtifactStore, bucket: str, prefix: str, dest: Path, manifest: dict | None = None
) -> Path:
    """Download the committed bundle under ``bucket/prefix`` into ``dest``, every file verified; with a signing
    key configured the signature is checked before anything is written."""
    data = store.get_bytes(bucket, f"{prefix}/{MANIFEST}")
    sig = (
        store.get_bytes(bucket, f"{prefix}/{SIGNATURE}")
        if store.stat(bucket, f"{prefix}/{SIGNATURE}")
        else None
    )
    verify_signature(data, sig, f"{bucket}/{prefix}")
    if manifest is None or sig is not None:  # the files to fetch come from the bytes the signature covers
        manifest = json.loads(data)
    extra = {MANIFEST: data} if sig is None else {MANIFEST: data, SIGNATURE: sig}
    dest = pull_tree(store, bucket, prefix, manifest["files"], dest, extra=extra)
    read_manifest(dest)  # every file was verified against the manifest while it streamed in
    return dest


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix")."""
    if not uri.startswith("s3://") or "/" not in uri[5:].strip("/"):
        raise RegistryError(f"{uri!r} is not an S3 URI like s3://models/<name>/<version>")
    bucket, _, prefix = uri[5:].strip("/").partition("/")
    return bucket, prefix
