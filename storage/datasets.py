"""The dataset registry: immutable image sets under ``datasets/<name>/<version>/`` in S3.

A version holds ``files/<relative path>`` for every image and a ``manifest.json`` (written last: the commit marker)
with each file's sha256, size and image shape. Training reads a version through its manifest, so a job re-run on
the same version sees exactly the same bytes. Pushing needs only the write-only ``uploader`` identity; images that
do not decode are still pushed (and marked), so validation can name them instead of the upload hiding them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from components.bundle import sha256_file
from components.datasets import IMAGE_EXTENSIONS
from storage.registry import _VERSION, RegistryError, actor, check_name, new_version
from storage.store import ArtifactStore, NotFound, sha256_bytes
from storage.trees import pull_tree, push_tree

MANIFEST = "manifest.json"


def describe_image(path: Path) -> dict[str, Any]:
    """Header facts of one image file: shape ``[h, w, channels]``, mode and format (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return {"shape": [h, w, len(im.getbands())], "mode": im.mode, "format": im.format}
    except Exception as exc:  # noqa: BLE001 - any undecodable file is recorded, not fatal
        return {"shape": None, "mode": None, "format": None, "error": f"{type(exc).__name__}: {exc}"[:200]}


def scan_folder(folder: Path, progress: bool = True) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes, shape, mode, format}}`` for every image file below ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegistryError(f"{folder} is not a folder of images")
    paths = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not paths:
        raise RegistryError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    files = {}
    for p in tqdm(paths, desc="hashing", unit="img", disable=not progress, leave=False):
        files[p.relative_to(folder).as_posix()] = {
            "sha256": sha256_file(p),
            "bytes": p.stat().st_size,
            **describe_image(p),
        }
    return files


class DatasetRegistry:
    """Push, list and fetch dataset versions in the ``datasets`` bucket."""

    def __init__(self, store: ArtifactStore | None = None):
        self.store = store or ArtifactStore()
        self.bucket = self.store.settings.datasets_bucket

    def push(self, folder: Path, name: str, note: str = "") -> str:
        """Upload every image below ``folder`` as a new version of dataset ``name``; return the version."""
        check_name(name, "dataset name")
        files = scan_folder(folder, progress=self.store.progress)
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
        }
        push_tree(self.store, self.bucket, f"{name}/{version}/files", Path(folder), files, resume=False)
        self.store.put_bytes(
            self.bucket, f"{name}/{version}/{MANIFEST}", json.dumps(manifest, indent=2).encode()
        )
        return version

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
        if ref != "latest":
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

    def fetch(self, name: str, ref: str = "latest", dest: Path | None = None) -> Path:
        """Download a version's images (verified) into ``dest`` (default: the local cache); return the folder.

        The folder appears only when complete; an existing complete copy is reused.
        """
        manifest = self.manifest(name, ref)
        version = manifest["version"]
        if dest is None:
            from storage.settings import tocoad_home

            dest = tocoad_home() / "cache" / "datasets" / name / version
        dest = Path(dest)
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
        return pull_tree(
            self.store, self.bucket, prefix, manifest["files"], dest, extra={marker.name: marker_data}
        )


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
