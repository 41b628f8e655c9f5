"""The model bundle: one directory holding everything a model is, checksummed, written atomically.

Layout (every file's sha256 is in ``manifest.json``, which is written last)::

    manifest.json               format version, package versions, config, checksums, metrics, data fingerprint
    manifest.sig                HMAC-SHA256 of manifest.json's bytes (only when a signing key is configured)
    config.yaml                 the full config, for people
    feature_extractor.safetensors   F (fine-tuned or pretrained)
    discriminator.safetensors   D (when stage 1 ran)
    heads.safetensors           SimSiam projector and predictor (when stage 2 ran)
    memory_bank.safetensors     the raw bank, float16
    index.faiss                 the faiss index (faiss's own serialisation, not pickle)
    calibration.json            threshold and score normalisation
    profile.json                training-data profile for drift checks

A bundle is built in a hidden sibling directory and renamed into place, so a half-written bundle is never
visible under its final name. Loading verifies every checksum first and never unpickles.

Signing is optional: with ``TOCOAD_SIGNING_KEY_FILE`` set (a file of at least 32 bytes, e.g. a mounted Secret),
:func:`write_bundle` writes ``manifest.sig`` and :func:`verify_bundle` refuses a bundle without a valid one
(exit status 5). Without a key nothing is signed and a present ``manifest.sig`` is ignored. Checksums prove a
bundle is intact; the signature proves a key holder wrote its manifest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import secrets
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path, PureWindowsPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SIGNING_KEY_ENV = "TOCOAD_SIGNING_KEY_FILE"
MIN_KEY_BYTES = 32
_PACKAGES = ("tocoad", "torch", "torchvision", "timm", "faiss-cpu", "numpy", "safetensors")


class BundleError(ValueError):
    """A bundle that is missing, incomplete or tampered with; the message names the file."""


class BundleChecksumError(BundleError):
    """A bundle file whose size or sha256 differs from its manifest (exit status 5, as for S3 objects)."""

    exit_code = 5


class BundleSignatureError(BundleError):
    """A bundle without a valid signature while a signing key is configured (exit status 5)."""

    exit_code = 5


class SigningKeyError(BundleError):
    """A configured signing key that cannot be read or is too short (exit status 2, bad settings)."""


class UnsafePathError(ValueError):
    """A path read from a manifest that could write or read outside its folder."""


def safe_relpath(rel: object, root: Path) -> Path:
    """``root / rel`` for a manifest path ``rel``, or :class:`UnsafePathError` unless it stays inside ``root``.

    ``rel`` must be a relative, normalised POSIX path: no leading ``/``, no drive, no backslash, no empty,
    ``.`` or ``..`` part. Every path read from a manifest (bundles, datasets) goes through here before use.
    """
    why = unsafe_path_reason(rel)
    if why is None:
        root = Path(root).resolve()
        target = (root / str(rel)).resolve()
        if target == root or root not in target.parents:
            why = "it resolves outside the folder"
    if why is not None:
        raise UnsafePathError(
            f"refusing manifest path {rel!r}: {why}; a manifest may only name relative paths inside its "
            "folder, so this one was written by someone who should not have — nothing was written"
        )
    return Path(root) / str(rel)


def unsafe_path_reason(rel: object) -> str | None:
    """Why ``rel`` may not be a manifest path (absolute, drive, backslash, NUL, not normalised), or None."""
    if not isinstance(rel, str) or not rel:
        return "it is not a non-empty string"
    if "\\" in rel or "\0" in rel:
        return "it holds a backslash or a NUL byte"
    if rel.startswith("/") or PureWindowsPath(rel).drive:
        return "it is absolute"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "it is not normalised (empty, '.' or '..' part)"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Streamed sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_index(folder: Path, exclude: str | None = None) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file below ``folder`` (but one named ``exclude``)."""
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != exclude
    }


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a model, plus Python's."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def partial_dir(dest: Path) -> Path:
    """A new empty hidden sibling of ``dest`` to fill before it is renamed to ``dest``.

    Unlike ``tempfile.mkdtemp`` (always mode 700) it gets the mode the user's umask gives any new folder, which
    the folder keeps after the rename.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(6)}")
        try:
            tmp.mkdir()  # mode 0o777 minus the umask
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a fresh folder beside {dest}")  # pragma: no cover


def write_bundle(
    out_dir: Path, populate: Callable[[Path], None], manifest: dict[str, Any], overwrite: bool = False
) -> Path:
    """Create a bundle at ``out_dir``: ``populate(tmp)`` writes the files, then checksums and manifest follow.

    The directory appears under its final name only when complete. With ``overwrite`` an existing bundle is
    replaced (the old one is moved aside first and removed after the swap).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir} already exists; choose another --out or remove it")
    tmp = partial_dir(out_dir)
    try:
        populate(tmp)
        files = file_index(tmp, exclude=MANIFEST)
        full = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "packages": package_versions(),
            **manifest,
            "files": files,
        }
        write_json(tmp / MANIFEST, full)
        if (key := signing_key()) is not None:
            (tmp / SIGNATURE).write_text(sign_manifest((tmp / MANIFEST).read_bytes(), key) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(bundle_dir: Path, data: bytes | None = None) -> dict[str, Any]:
    """The bundle's manifest (parsed from ``data`` when given, the bytes already read), with a clear
    :class:`BundleError` when it is missing, damaged or of another format."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if data is None and not path.is_file():
        raise BundleError(
            f"{bundle_dir} is not a model bundle (no {MANIFEST}); it may be incomplete — train again or pull it again"
        )
    try:
        manifest = json.loads(path.read_bytes() if data is None else data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); the bundle is damaged") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{bundle_dir} has bundle format {version}, this tocoad reads format {FORMAT_VERSION}"
        )
    return manifest


def signing_key() -> bytes | None:
    """The key in the file named by ``TOCOAD_SIGNING_KEY_FILE`` (surrounding whitespace stripped), or None if unset."""
    path = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if not path:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise SigningKeyError(
            f"{SIGNING_KEY_ENV}={path} cannot be read ({exc.strerror}); mount the signing key there or unset it"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise SigningKeyError(
            f"the signing key in {path} has {len(key)} bytes, at least {MIN_KEY_BYTES} are needed; "
            "generate one with `openssl rand -hex 32`"
        )
    return key


def sign_manifest(manifest_bytes: bytes, key: bytes) -> str:
    """Hex HMAC-SHA256 of the exact manifest bytes."""
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def verify_signature(manifest_bytes: bytes, signature: bytes | None, where: str) -> None:
    """With a signing key configured, raise :class:`BundleSignatureError` unless ``signature`` (the content of
    ``manifest.sig``, None when absent) is the manifest's HMAC; without a key, do nothing."""
    key = signing_key()
    if key is None:
        return
    if signature is None:
        raise BundleSignatureError(
            f"{where} is not signed (no {SIGNATURE}) but {SIGNING_KEY_ENV} is set: refusing a bundle of unknown "
            "origin; have the training job that holds the key write or re-train it"
        )
    expected = sign_manifest(manifest_bytes, key)
    if not hmac.compare_digest(signature.strip(), expected.encode()):
        raise BundleSignatureError(
            f"{where} has a wrong signature ({SIGNATURE} does not match {MANIFEST} under the configured key): the "
            "manifest was changed or signed with another key; do not use it"
        )


def verify_bundle(bundle_dir: Path) -> dict[str, Any]:
    """Check the signature (when a key is configured), the manifest and every file's size and sha256; return the
    manifest or raise :class:`BundleError`."""
    bundle_dir = Path(bundle_dir)
    path, sig = bundle_dir / MANIFEST, bundle_dir / SIGNATURE
    data = path.read_bytes() if path.is_file() else None
    manifest = read_manifest(bundle_dir, data)  # the checked bytes are the parsed ones
    verify_signature(data or b"", sig.read_bytes() if sig.is_file() else None, f"bundle {bundle_dir}")
    for name, info in manifest.get("files", {}).items():
        file = safe_relpath(name, bundle_dir)
        if not file.is_file():
            raise BundleError(f"bundle file {file} is missing")
        if file.stat().st_size != info["bytes"] or sha256_file(file) != info["sha256"]:
            raise BundleChecksumError(
                f"checksum mismatch for {file}: the bundle was modified or damaged; do not use it"
            )
    return manifest


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as safetensors (contiguous CPU copies)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (call :func:`verify_bundle` first)."""
    return load_file(str(path))


def write_json(path: Path, data: Any) -> None:
    """JSON with numpy scalars and arrays and paths converted."""
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
