"""The dataset registry: immutable image sets under ``datasets/<name>/<version>/`` in S3.

A version holds ``files/<relative path>`` for every image and a ``manifest.json`` (written last: the commit marker)
with each file's sha256, size and image shape. Training reads a version through its manifest, so a job re-run on
the same version sees exactly the same bytes. Pushing needs only the write-only ``uploader`` identity; images that
do not decode are still pushed (and marked), so validation can name them instead of the upload hiding them.

A version is write-once: a push first claims it (``push.json``) and then commits its manifest, both with
``If-None-Match: *``, so the server refuses a second push into it. Links that leave the pushed folder, hidden names
and other files are skipped, each reported. ``data list`` and :meth:`DatasetRegistry.fetch` check a version against
its manifest and call it damaged when files are missing or were changed after the commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from components.bundle import UnsafePathError, safe_relpath, sha256_file, unsafe_path_reason
from components.datasets import IMAGE_EXTENSIONS
from storage.registry import _VERSION, RegistryError, actor, check_name, new_version, prune_versions
from storage.store import (
    AccessDenied,
    AlreadyExists,
    ArtifactStore,
    ChecksumError,
    NotFound,
    StoreError,
    sha256_bytes,
)
from storage.trees import check_paths, pull_tree, push_tree

MANIFEST = "manifest.json"
CLAIM = "push.json"  # written first, write-once: a second push into the same version stops before any file
DAMAGED = "damaged.json"  # written by a fetch that found the version damaged
MTIME_SLACK_S = 2.0  # a file listed this much newer than its manifest was rewritten after the commit
log = logging.getLogger("tocoad.storage")


class DatasetDamaged(RegistryError):
    """A committed version whose files are missing or changed; it must be pushed again."""

    exit_code = 5


def describe_image(path: Path) -> dict[str, Any]:
    """Header facts of one image file: shape ``[h, w, channels]``, mode and format (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return {"shape": [h, w, len(im.getbands())], "mode": im.mode, "format": im.format}
    except Exception as exc:  # noqa: BLE001 - any undecodable file is recorded, not fatal
        return {"shape": None, "mode": None, "format": None, "error": f"{type(exc).__name__}: {exc}"[:200]}


def _entries(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """Every file below ``folder``, without entering links to folders or hidden folders: those come with the
    reason they are not read."""
    for top, dirs, names in os.walk(folder):
        for d in sorted(dirs):
            if (Path(top) / d).is_symlink():
                yield Path(top) / d, "link to a folder (not followed)"
            elif d.startswith("."):
                yield Path(top) / d, "hidden folder (not read)"
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (Path(top) / d).is_symlink())
        for n in sorted(names):
            yield Path(top) / n, None


def _skip_reason(path: Path, rel: str, root: Path) -> str | None:
    """Why a file below the folder is not pushed, or None to push it."""
    if path.is_symlink():
        target = path.resolve()
        if root not in target.parents:
            return f"link to {os.readlink(path)} leaves the folder (not followed)"
        if not target.is_file():
            return "link to something that is not a file"
    if any(part.startswith(".") for part in rel.split("/")):
        return "hidden name"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image ({path.suffix or 'no extension'})"
    try:
        safe_relpath(rel, root)
    except UnsafePathError:
        return "a name a manifest may not hold (backslash, drive or NUL)"
    return None


def scan_folder(folder: Path, progress: bool = True) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The images below ``folder``, ``{relative path: {sha256, bytes, shape, mode, format}}``, and the files skipped,
    ``{relative path: why}`` (links that leave the folder, hidden names, other files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegistryError(f"{folder} is not a folder of images")
    root = folder.resolve()
    paths, skipped = [], {}
    for path, folder_why in _entries(folder):
        rel = path.relative_to(folder).as_posix()
        if folder_why is not None:
            skipped[f"{rel}/"] = folder_why
        elif (why := _skip_reason(path, rel, root)) is not None:
            skipped[rel] = why
        else:
            paths.append(path)
    if not paths:
        raise RegistryError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    files = {}
    for p in tqdm(sorted(paths), desc="hashing", unit="img", disable=not progress, leave=False):
        files[p.relative_to(folder).as_posix()] = {
            "sha256": sha256_file(p),
            "bytes": p.stat().st_size,
            **describe_image(p),
        }
    return files, skipped


def _log_skipped(rel: str, why: str) -> None:
    log.warning("skipped %s: %s", rel, why)


def manifest_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` when well formed (``{path: {"sha256": str, "bytes": int, ...}}``), else ``{}``."""
    files = manifest.get("files")
    ok = isinstance(files, dict) and all(
        isinstance(m, dict) and isinstance(m.get("sha256"), str) and isinstance(m.get("bytes"), int)
        for m in files.values()
    )
    return files if ok else {}


def manifest_problems(name: str, version: str, manifest: dict[str, Any]) -> list[str]:
    """Where a manifest contradicts itself or its version id (a rewritten manifest shows here)."""
    files = manifest_files(manifest)
    content = sha256_bytes(json.dumps(files, sort_keys=True).encode())
    problems = [] if files or manifest.get("files") == {} else ["the manifest's file list is malformed"]
    if (manifest.get("name"), manifest.get("version")) != (name, version):
        problems.append(f"the manifest names {manifest.get('name')}/{manifest.get('version')}")
    if manifest.get("content_sha256") != content or not version.endswith(content[:8]):
        problems.append("the manifest's file list does not match its content hash or version id")
    if manifest.get("count") != len(files):
        problems.append(f"the manifest counts {manifest.get('count')} files but lists {len(files)}")
    problems += [f"unsafe path {rel!r}: {why}" for rel in files if (why := unsafe_path_reason(rel))]
    return problems


class DatasetRegistry:
    """Push, list and fetch dataset versions in the ``datasets`` bucket."""

    def __init__(self, store: ArtifactStore | None = None):
        self.store = store or ArtifactStore()
        self.bucket = self.store.settings.datasets_bucket

    def push(
        self,
        folder: Path,
        name: str,
        note: str = "",
        report: Callable[[str, str], None] = _log_skipped,
    ) -> str:
        """Upload every image below ``folder`` as a new version of dataset ``name``; return the version.

        ``report(relative path, why)`` is called for each file that is skipped (they are listed in the manifest too).
        """
        check_name(name, "dataset name")
        files, skipped = scan_folder(folder, progress=self.store.progress)
        for rel, why in skipped.items():
            report(rel, why)
        content = sha256_bytes(json.dumps(files, sort_keys=True).encode())
        version = new_version(content)
        manifest = {
            "name": name,
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "by": actor(),
            "note": note,
            "source": str(Path(folder).resolve()),
            "count": len(files),
            "bytes": sum(f["bytes"] for f in files.values()),
            "content_sha256": content,
            "files": files,
            "skipped": skipped,
        }
        self._write_once(name, version, CLAIM, {"by": manifest["by"], "created": manifest["created"]})
        push_tree(self.store, self.bucket, f"{name}/{version}/files", Path(folder), files, resume=False)
        self._write_once(name, version, MANIFEST, manifest)
        return version

    def _write_once(self, name: str, version: str, rel: str, data: dict[str, Any]) -> None:
        """Write ``rel`` of a version unless it exists (the server refuses); a committed version is refused too."""
        committed = f"dataset {name} version {version} exists already; versions are write-once, push again"
        with contextlib.suppress(AccessDenied):  # the uploader may not look; the conditional write guards it
            if self.store.stat(self.bucket, f"{name}/{version}/{MANIFEST}") is not None:
                raise RegistryError(committed)
        try:
            self.store.put_bytes(
                self.bucket, f"{name}/{version}/{rel}", json.dumps(data, indent=2).encode(), if_absent=True
            )
        except AlreadyExists:
            raise RegistryError(committed) from None

    def names(self) -> list[str]:
        """Dataset names."""
        return sorted(
            p.rstrip("/") for p in self.store.list(self.bucket, "", recursive=False) if p.endswith("/")
        )

    def versions(self, name: str) -> list[str]:
        """Committed versions of a dataset, oldest first."""
        check_name(name, "dataset name")
        prefixes = self.store.list(self.bucket, f"{name}/", recursive=False)
        candidates = [p.rstrip("/").rsplit("/", 1)[-1] for p in prefixes]
        return [
            v
            for v in sorted(candidates)
            if _VERSION.match(v) and self.store.stat(self.bucket, f"{name}/{v}/{MANIFEST}") is not None
        ]

    def resolve(self, name: str, ref: str = "latest") -> str:
        """A version id from a version id or ``latest``."""
        check_name(name, "dataset name")
        if ref != "latest":
            if not _VERSION.match(ref):
                raise RegistryError(
                    f"{ref!r} is not a dataset version id (like 20261130T120000.000Z-1a2b3c4d)"
                )
            return ref
        versions = self.versions(name)
        if not versions:
            raise RegistryError(
                f"dataset {name} has no versions; push one with `tocoad data push DIR --name {name}`"
            )
        return versions[-1]

    def manifest(self, name: str, ref: str = "latest") -> dict[str, Any]:
        """A committed version's manifest."""
        version = self.resolve(name, ref)
        try:
            return json.loads(self.store.get_bytes(self.bucket, f"{name}/{version}/{MANIFEST}"))
        except NotFound:
            raise RegistryError(
                f"dataset {name} has no committed version {version}; see `tocoad data list`"
            ) from None

    def put_extra(
        self, name: str, version: str, rel: str, data: bytes, content_type: str = "application/json"
    ) -> str:
        """Store a file next to a version (validation results, status); returns its key."""
        key = f"{name}/{version}/{rel}"
        self.store.put_bytes(self.bucket, key, data, content_type=content_type)
        return key

    def get_extra(self, name: str, version: str, rel: str) -> bytes | None:
        """A file stored next to a version, or None."""
        try:
            return self.store.get_bytes(self.bucket, f"{name}/{version}/{rel}")
        except NotFound:
            return None

    def check(self, name: str, version: str, manifest: dict[str, Any] | None = None) -> list[str]:
        """What is wrong with a committed version (empty when intact): the manifest against itself, and each file
        against the manifest — missing, of another size, or written after the manifest. One listing, no download;
        a fetch also checks every byte. A version a fetch found damaged stays marked (``damaged.json``)."""
        manifest = manifest or self.manifest(name, version)
        problems = manifest_problems(name, version, manifest)
        listed = self.store.listing(self.bucket, f"{name}/{version}/")
        commit = listed.get(f"{name}/{version}/{MANIFEST}")
        for rel, meta in manifest_files(manifest).items():
            obj = listed.get(f"{name}/{version}/files/{rel}")
            if obj is None:
                problems.append(f"files/{rel} is missing")
            elif obj.size != meta["bytes"]:
                problems.append(f"files/{rel} has {obj.size} bytes, the manifest says {meta['bytes']}")
            elif commit is not None and obj.modified > commit.modified + MTIME_SLACK_S:
                problems.append(f"files/{rel} was written after the commit")
        if f"{name}/{version}/{DAMAGED}" in listed and (marked := self.get_extra(name, version, DAMAGED)):
            problems += [p for p in json.loads(marked).get("problems", []) if p not in problems]
        return problems

    def _damaged(self, name: str, version: str, problems: list[str]) -> DatasetDamaged:
        """Mark a version damaged (when this identity may) and return the error that says so."""
        record = {
            "by": actor(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "problems": problems,
        }
        with contextlib.suppress(StoreError):
            self.put_extra(name, version, DAMAGED, json.dumps(record, indent=2).encode())
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        return DatasetDamaged(
            f"dataset {name} version {version} is damaged ({shown}); do not train on it, push the images again"
        )

    def fetch(self, name: str, ref: str = "latest", dest: Path | None = None) -> Path:
        """Download a version's images (verified) into ``dest`` (default: the local cache); return the folder.

        The folder appears only when complete; an existing complete copy is reused. Paths that would leave
        ``dest`` are refused, and a damaged version is marked and refused, before anything is written.
        """
        version = self.resolve(name, ref)
        manifest = self.manifest(name, version)
        if dest is None:
            from storage.settings import tocoad_home

            dest = tocoad_home() / "cache" / "datasets" / name / version
        dest = Path(dest)
        check_paths(manifest_files(manifest), dest)
        if problems := self.check(name, version, manifest):
            raise self._damaged(name, version, problems)
        marker = dest / ".tocoad-dataset.json"
        if (
            marker.is_file()
            and json.loads(marker.read_text()).get("content_sha256") == manifest["content_sha256"]
        ):
            return dest
        if dest.exists():
            raise RegistryError(
                f"{dest} exists and is not dataset {name} {version}; remove it or choose another"
            )
        marker_data = json.dumps({k: manifest[k] for k in ("name", "version", "content_sha256")}).encode()
        prefix = f"{name}/{version}/files"
        try:
            return pull_tree(
                self.store, self.bucket, prefix, manifest["files"], dest, extra={marker.name: marker_data}
            )
        except (ChecksumError, NotFound) as exc:
            raise self._damaged(name, version, [str(exc)]) from exc

    def prune(self, name: str, keep: int | None = None, stale_after_s: float = 24 * 3600) -> list[str]:
        """Drop cut-off pushes (no manifest) older than ``stale_after_s`` and abort incomplete multipart uploads
        as old; with ``keep``, also delete all but the newest ``keep`` committed versions. Returns the deleted."""
        if keep is not None and keep < 1:
            raise RegistryError("keep must be at least 1")
        versions = self.versions(name)
        prefixes = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.store.list(self.bucket, f"{name}/", False)]
        partial = [v for v in prefixes if _VERSION.match(v) and v not in versions]
        doomed = versions[: max(0, len(versions) - keep)] if keep else []
        return prune_versions(self.store, self.bucket, name, doomed, partial, stale_after_s)


def parse_dataset_uri(uri: str) -> tuple[str, str] | None:
    """``s3://datasets/<name>[/<version>|latest]`` or ``dataset:<name>[@<version>]`` -> (name, ref); else None."""
    if uri.startswith("dataset:"):
        name, _, ref = uri[len("dataset:") :].partition("@")
        return name, ref or "latest"
    if uri.startswith("s3://"):
        parts = uri[len("s3://") :].strip("/").split("/")
        if len(parts) in (2, 3):
            return parts[1], parts[2] if len(parts) == 3 else "latest"
        raise RegistryError(f"{uri}: a dataset URI looks like s3://datasets/<name>/<version>")
    return None
