"""The artifact store: objects in S3 with a sha256 on each, retries with backoff, and errors that say what to do.

Every object carries its sha256 in the ``x-amz-meta-sha256`` header. Uploads hash the bytes as they are sent and
refuse to finish when the file changed under them; downloads hash as they receive, into a temporary file that is
renamed into place only when the checksum matches. Large objects go up in multipart parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from tqdm import tqdm

from storage.settings import StorageSettings, resolve_settings

PART_SIZE = 16 * 1024 * 1024
CHUNK = 1024 * 1024
SHA_KEY = "sha256"
T = TypeVar("T")


class StoreError(ValueError):
    """Base of the store's errors; the text names the object and what to do."""


class StoreUnavailable(StoreError):
    """The S3 server cannot be reached or keeps failing (after retries)."""

    exit_code = 3


class AccessDenied(StoreError):
    """The credentials are wrong or this identity may not do that."""

    exit_code = 4


class NotFound(StoreError):
    """The bucket or object does not exist."""


class ChecksumError(StoreError):
    """An object's bytes do not match its recorded sha256."""

    exit_code = 5


class AlreadyExists(StoreError):
    """A write-once object is already there (the server refused to overwrite it)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object."""

    key: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class Listed:
    """One object as a listing shows it: size and last-modified time (Unix seconds), no checksum."""

    size: int
    modified: float


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: float  # Unix seconds


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


class _HashingReader(io.RawIOBase):
    """A file reader that hashes what it hands out (and ticks a progress bar)."""

    def __init__(self, fh: io.BufferedReader, bar: tqdm | None):
        self.fh, self.bar, self.hash = fh, bar, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        if self.bar is not None:
            self.bar.update(len(data))
        return data

    def readable(self) -> bool:
        return True


def _progress(total: int, desc: str, enabled: bool) -> tqdm | None:
    if not enabled or total < 8 * CHUNK:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


class ArtifactStore:
    """Checksummed objects in S3 buckets, for one identity (see :mod:`storage.settings`)."""

    def __init__(self, settings: StorageSettings | None = None, progress: bool = True):
        self.settings = settings or resolve_settings()
        self.progress = progress
        s = self.settings
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=120),
            maxsize=16,
            cert_reqs="CERT_REQUIRED" if s.secure else "CERT_NONE",
            ca_certs=(s.ca_bundle or certifi.where()) if s.secure else None,
            retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0),
        )
        # region given up front: no GetBucketLocation call, which narrow identities may not make
        self.client = Minio(
            s.endpoint, s.access_key, s.secret_key, secure=s.secure, region=s.region, http_client=http
        )

    # ------------------------------------------------------------------ error handling
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one S3 operation with retries on connection errors and 5xx; map errors to :class:`StoreError`."""
        delay = 0.5
        for attempt in range(1, self.settings.retries + 1):
            try:
                return fn()
            except S3Error as exc:
                if not _transient(exc):
                    raise self._s3_error(what, exc) from None
                detail = f"{exc.code}, HTTP {getattr(exc.response, 'status', '?')}"
            except (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, ConnectionError) as exc:
                status = getattr(exc, "status_code", None) or getattr(exc, "_code", None)
                detail = f"HTTP {status}" if status else type(exc).__name__
            if attempt == self.settings.retries:
                raise StoreUnavailable(
                    f"{what}: the S3 server at {self.settings.url} is unreachable or failing ({detail}) "
                    f"after {attempt} attempts; check TOCOAD_S3_ENDPOINT, or `tocoad storage status` for "
                    "the local server"
                )
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def _s3_error(self, what: str, exc: S3Error) -> StoreError:
        code = exc.code or ""
        if code in ("NoSuchBucket",):
            return NotFound(
                f"{what}: bucket {exc.bucket_name!r} does not exist on {self.settings.url}; create it "
                "(`tocoad storage up` does for the local server, the minio setup Job on a cluster)"
            )
        if code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound", "NoSuchUpload"):
            return NotFound(f"{what}: {exc.bucket_name}/{exc.object_name} does not exist")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            return AccessDenied(
                f"{what}: access denied for identity {self.settings.access_key!r} ({code}); check the "
                "credentials, or use an identity allowed to do this (admin, predictor, uploader)"
            )
        if code == "PreconditionFailed":
            return AlreadyExists(
                f"{what}: the object exists already and is write-once; nothing was overwritten"
            )
        if code in ("EntityTooLarge", "QuotaExceeded", "XMinioStorageFull", "InsufficientStorage"):
            return StoreError(f"{what}: the S3 server is out of space ({code}); free space and retry")
        return StoreError(f"{what}: the S3 server refused ({code}: {exc.message})")

    # ------------------------------------------------------------------ objects
    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        """Size and sha256 of an object, or None when it does not exist."""
        try:
            st = self._call(f"stat {bucket}/{key}", lambda: self.client.stat_object(bucket, key))
        except NotFound as exc:
            if "bucket" in str(exc):
                raise
            return None
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        return ObjectInfo(key, int(st.size or 0), meta.get(f"x-amz-meta-{SHA_KEY}"))

    def put_file(self, bucket: str, key: str, path: Path, sha256: str | None = None) -> ObjectInfo:
        """Upload a file (multipart when large). ``sha256``, when known, is checked against the bytes sent."""
        path = Path(path)
        if sha256 is None:
            from components.bundle import sha256_file  # the one streamed-hash helper

            sha256 = sha256_file(path)
        size = path.stat().st_size

        def upload() -> ObjectInfo:
            bar = _progress(size, f"up {Path(key).name}", self.progress)
            try:
                with open(path, "rb") as fh:
                    reader = _HashingReader(fh, bar)
                    self.client.put_object(
                        bucket, key, reader, size, metadata={SHA_KEY: sha256}, part_size=PART_SIZE
                    )
            finally:
                if bar is not None:
                    bar.close()
            if reader.hash.hexdigest() != sha256:
                with contextlib.suppress(S3Error):
                    self.client.remove_object(bucket, key)
                raise ChecksumError(
                    f"{path} changed while it was uploaded to {bucket}/{key}; upload it again"
                )
            return ObjectInfo(key, size, sha256)

        return self._call(f"upload {path} to {bucket}/{key}", upload)

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes,
        content_type: str = "application/json",
        if_absent: bool = False,
    ) -> ObjectInfo:
        """Upload small bytes in one PUT (atomic for readers: they see the old or the new object).

        With ``if_absent`` the server itself refuses to overwrite an existing object (``If-None-Match: *``,
        which needs no read right) and :class:`AlreadyExists` is raised.
        """
        digest = sha256_bytes(data)
        headers = {"Content-Type": content_type, f"x-amz-meta-{SHA_KEY}": digest}
        if if_absent:
            headers["If-None-Match"] = "*"
        # minio's put_object takes no request headers; _put_object is its single-PUT step, stable across 7.x
        self._call(
            f"upload {bucket}/{key}", lambda: self.client._put_object(bucket, key, data, headers=headers)
        )
        return ObjectInfo(key, len(data), digest)

    def get_bytes(self, bucket: str, key: str, sha256: str | None = None) -> bytes:
        """Download a small object whole and check it against ``sha256`` and its own recorded sha256."""

        def fetch() -> tuple[bytes, str | None]:
            resp = self.client.get_object(bucket, key)
            try:
                meta = {k.lower(): v for k, v in resp.headers.items()}
                return resp.read(), meta.get(f"x-amz-meta-{SHA_KEY}")
            finally:
                resp.close()
                resp.release_conn()

        data, recorded = self._call(f"download {bucket}/{key}", fetch)
        _check(f"{bucket}/{key}", sha256_bytes(data), sha256, recorded)
        return data

    def get_file(self, bucket: str, key: str, dest: Path, sha256: str | None = None) -> ObjectInfo:
        """Stream an object to ``dest``; it appears there only when its sha256 matches (``sha256`` and recorded)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")

        def fetch() -> ObjectInfo:
            resp = self.client.get_object(bucket, key)
            meta = {k.lower(): v for k, v in resp.headers.items()}
            size = int(meta.get("content-length", 0))
            h = hashlib.sha256()
            bar = _progress(size, f"down {Path(key).name}", self.progress)
            try:
                with open(tmp, "wb") as fh:
                    for block in resp.stream(CHUNK):
                        h.update(block)
                        fh.write(block)
                        if bar is not None:
                            bar.update(len(block))
            finally:
                resp.close()
                resp.release_conn()
                if bar is not None:
                    bar.close()
            _check(f"{bucket}/{key}", h.hexdigest(), sha256, meta.get(f"x-amz-meta-{SHA_KEY}"))
            os.replace(tmp, dest)
            return ObjectInfo(key, size, h.hexdigest())

        try:
            return self._call(f"download {bucket}/{key}", fetch)
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, bucket: str, prefix: str = "", recursive: bool = True) -> Iterator[str]:
        """Keys (or, non-recursively, key prefixes ending in ``/``) under ``prefix``."""
        names = self._call(
            f"list {bucket}/{prefix}",
            lambda: [
                o.object_name for o in self.client.list_objects(bucket, prefix=prefix, recursive=recursive)
            ],
        )
        yield from names

    def listing(self, bucket: str, prefix: str) -> dict[str, Listed]:
        """``{key: Listed}`` for every object under ``prefix`` (one listing, no per-object request)."""
        objects = self._call(
            f"list {bucket}/{prefix}",
            lambda: list(self.client.list_objects(bucket, prefix=prefix, recursive=True)),
        )
        return {
            o.object_name: Listed(int(o.size or 0), o.last_modified.timestamp() if o.last_modified else 0.0)
            for o in objects
        }

    def pending_uploads(self, bucket: str, prefix: str) -> list[PendingUpload]:
        """Multipart uploads under ``prefix`` that were started and never completed nor aborted."""
        found: list[PendingUpload] = []
        marker: str | None = None
        while True:
            # minio has no public call for ListMultipartUploads; _list_multipart_uploads is stable across 7.x
            page = self._call(
                f"list incomplete uploads in {bucket}/{prefix}",
                lambda m=marker: self.client._list_multipart_uploads(bucket, prefix=prefix, key_marker=m),
            )
            found += [
                PendingUpload(
                    u.object_name,
                    u.upload_id or "",
                    u.initiated_time.timestamp() if u.initiated_time else 0.0,
                )
                for u in page.uploads
            ]
            if not page.is_truncated or not page.next_key_marker:
                return found
            marker = page.next_key_marker

    def abort_stale_uploads(self, bucket: str, prefix: str, older_than_s: float | None = None) -> list[str]:
        """Abort the incomplete multipart uploads under ``prefix`` (only those started over ``older_than_s``
        seconds ago, when given); return their keys."""
        cutoff = None if older_than_s is None else time.time() - older_than_s
        aborted = []
        for up in self.pending_uploads(bucket, prefix):
            if cutoff is not None and up.initiated > cutoff:
                continue
            with contextlib.suppress(NotFound):  # finished or aborted meanwhile
                self._call(
                    f"abort upload of {bucket}/{up.key}",
                    lambda u=up: self.client._abort_multipart_upload(bucket, u.key, u.upload_id),
                )
            aborted.append(up.key)
        return aborted

    def delete(self, bucket: str, key: str) -> None:
        """Delete one object (no error when it is already gone)."""
        self._call(f"delete {bucket}/{key}", lambda: self.client.remove_object(bucket, key))

    def delete_prefix(self, bucket: str, prefix: str, first: str | None = None) -> int:
        """Delete every object under ``prefix`` (``first``, e.g. a commit marker, before the rest)."""
        keys = sorted(self.list(bucket, prefix), key=lambda k: k != first)
        for key in keys:
            self.delete(bucket, key)
        return len(keys)

    def ensure_buckets(self, *buckets: str) -> None:
        """Create the buckets that do not exist (needs the admin identity)."""
        for bucket in buckets:
            if not self._call(f"check bucket {bucket}", lambda b=bucket: self.client.bucket_exists(b)):
                self._call(f"create bucket {bucket}", lambda b=bucket: self.client.make_bucket(b))

    def describe(self) -> dict[str, Any]:
        """Endpoint and identity, for messages."""
        return {
            "endpoint": self.settings.url,
            "access_key": self.settings.access_key,
            "local": self.settings.local,
        }


def _transient(exc: S3Error) -> bool:
    """An S3 error answer worth retrying: a 5xx (e.g. InternalError while a server starts) or a throttle."""
    status = getattr(exc.response, "status", 0) or 0
    return status >= 500 or exc.code in ("SlowDown", "RequestTimeout")


def _check(name: str, actual: str, expected: str | None, recorded: str | None) -> None:
    for want, source in ((expected, "the manifest"), (recorded, "its recorded sha256")):
        if want and actual != want:
            raise ChecksumError(
                f"checksum mismatch for {name}: the object does not match {source} (got {actual[:12]}…, "
                f"want {want[:12]}…); it was altered or damaged — do not use it, push or register it again"
            )
