"""Folders in S3: upload a set of checksummed files under a prefix, and download them back atomically.

Both registries build on these two functions; the caller writes its commit marker (a manifest) after
:func:`push_tree` returns, and a reader trusts a prefix only once that marker is there. Every path a manifest names
is checked (:func:`components.bundle.safe_relpath`) before anything is written.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from tqdm import tqdm

from components.bundle import partial_dir, safe_relpath
from storage.store import AccessDenied, ArtifactStore


def push_tree(
    store: ArtifactStore,
    bucket: str,
    prefix: str,
    folder: Path,
    files: dict[str, dict[str, Any]],
    resume: bool,
) -> None:
    """Upload ``files`` (``{relative path: {"sha256", "bytes"}}``) from ``folder`` to ``bucket/prefix/...``.

    With ``resume``, files already there with the same sha256 and size are skipped (a cut-off upload continues)
    and the incomplete multipart uploads a cut-off run left under ``prefix`` are aborted first.
    """
    if resume:
        with contextlib.suppress(AccessDenied):  # an identity that may not list uploads leaves them to prune
            store.abort_stale_uploads(bucket, f"{prefix}/")
    total = sum(meta["bytes"] for meta in files.values())
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"upload {prefix}", disable=not store.progress
    ) as bar:
        for rel, meta in files.items():
            key = f"{prefix}/{rel}"
            have = store.stat(bucket, key) if resume else None
            if have is None or have.sha256 != meta["sha256"] or have.size != meta["bytes"]:
                store.put_file(bucket, key, Path(folder) / rel, sha256=meta["sha256"])
            bar.update(meta["bytes"])


def check_paths(files: dict[str, Any], dest: Path) -> None:
    """Refuse (:class:`components.bundle.UnsafePathError`) any manifest path that would not land inside ``dest``."""
    for rel in files:
        safe_relpath(rel, dest)


def pull_tree(
    store: ArtifactStore,
    bucket: str,
    prefix: str,
    files: dict[str, dict[str, Any]],
    dest: Path,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Download ``files`` from ``bucket/prefix/...`` into ``dest``, each checked against its sha256.

    Everything lands in a hidden sibling folder first (plus the ``extra`` files, e.g. the manifest), which is
    renamed to ``dest`` only when complete: ``dest`` never holds a partial download. A path that would leave
    ``dest`` is refused before anything is written.
    """
    dest = Path(dest)
    check_paths({**files, **(extra or {})}, dest)
    tmp = partial_dir(dest)
    total = sum(meta["bytes"] for meta in files.values())
    try:
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"download {prefix}", disable=not store.progress
        ) as bar:
            for rel, meta in files.items():
                store.get_file(bucket, f"{prefix}/{rel}", tmp / rel, sha256=meta["sha256"])
                bar.update(meta["bytes"])
        for rel, data in (extra or {}).items():
            (tmp / rel).write_bytes(data)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
