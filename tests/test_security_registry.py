"""Issue 12, registry and datasets (holes 1-5 and 12): each test is named after the hole it keeps closed.

They run against the real local S3 server (SeaweedFS ``weed mini``, the session fixture ``s3_server``) with the
three identities, doing what an attacker holding the ``uploader`` credentials (or a killed upload) would do.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from test_storage import make_bundle

from components.bundle import (
    MANIFEST,
    SIGNATURE,
    SIGNING_KEY_ENV,
    BundleSignatureError,
    SigningKeyError,
    verify_bundle,
)
from storage import datasets as datasets_module
from storage.datasets import DatasetRegistry
from storage.registry import ModelRegistry, RegistryError, new_version
from storage.settings import resolve_settings
from storage.store import AccessDenied, ArtifactStore, sha256_bytes
from tocoad.cli import main


@pytest.fixture
def admin(s3_server) -> ArtifactStore:
    return ArtifactStore(resolve_settings("admin"), progress=False)


@pytest.fixture
def uploader(s3_server) -> ArtifactStore:
    return ArtifactStore(resolve_settings("uploader"), progress=False)


def _name(request) -> str:
    return request.node.name.replace("_", "-").lower()[:60]


def _images(folder: Path, count: int = 3, size: int = 16) -> Path:
    """``count`` small distinct PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), (i * 60, 10, 20)).save(folder / f"{i}.png")
    return folder


def _forge_dataset(store: ArtifactStore, name: str, objects: dict[str, bytes], paths: dict[str, str]) -> str:
    """Write a dataset version by hand, as a raw S3 client would: ``objects`` under ``files/`` and a manifest whose
    ``files`` maps each of ``paths`` to the object of the same key. The manifest is otherwise consistent (content
    hash, version id), so only the paths are wrong."""
    files = {
        p: {"sha256": sha256_bytes(objects[k]), "bytes": len(objects[k]), "shape": None}
        for p, k in paths.items()
    }
    content = sha256_bytes(json.dumps(files, sort_keys=True).encode())
    version = new_version(content)
    for key, data in objects.items():
        store.put_bytes("datasets", f"{name}/{version}/files/{key}", data, content_type="image/png")
    manifest = {"name": name, "version": version, "count": len(files), "bytes": 0, "content_sha256": content,
                "files": files}  # fmt: skip
    store.put_bytes("datasets", f"{name}/{version}/manifest.json", json.dumps(manifest).encode())
    return version


def _pending(store: ArtifactStore, bucket: str, prefix: str) -> list[str]:
    """Keys of the incomplete multipart uploads under ``prefix``, straight from the server."""
    return [u.object_name for u in store.client._list_multipart_uploads(bucket, prefix=prefix).uploads]


def _leave_upload(store: ArtifactStore, bucket: str, key: str) -> None:
    """Start a multipart upload and send one part, then walk away (what a killed upload leaves)."""
    upload_id = store.client._create_multipart_upload(
        bucket, key, {"Content-Type": "application/octet-stream"}
    )
    store.client._upload_part(bucket, key, os.urandom(5 * 2**20), None, upload_id, 1)


# ---------------------------------------------------------------- 1
def test_manifest_with_absolute_path_is_refused_before_writing(admin, uploader, tmp_path, request, capsys):
    name = _name(request)
    outside = tmp_path / "outside" / "pwned.png"  # where the attacker wants a file
    evil = b"\x89PNG written outside the cache"
    # the absolute form, with the object at the key the old client read (S3 folds the double slash)
    version = _forge_dataset(
        uploader, name, {str(outside).lstrip("/"): evil}, {str(outside): str(outside).lstrip("/")}
    )
    dest = tmp_path / "cache" / "copy"
    assert main(["data", "fetch", f"{name}@{version}", "--out", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "refusing manifest path" in err and str(outside) in err and "Traceback" not in err
    assert not outside.exists() and not outside.parent.exists()
    assert not dest.exists() and not dest.parent.exists()  # nothing written, not even the partial folder

    # every other form a manifest may not hold is refused the same way, before any download
    for bad in (
        "../escape.png",
        "a/../../escape.png",
        "a\\b.png",
        "C:/x.png",
        "C:x.png",
        "./a.png",
        "a//b.png",
    ):
        version = _forge_dataset(uploader, name, {"x.png": evil}, {bad: "x.png"})
        assert main(["data", "fetch", f"{name}@{version}", "--out", str(dest)]) == 2, bad
        assert "refusing manifest path" in capsys.readouterr().err, bad
        assert not dest.exists() and not (tmp_path / "escape.png").exists(), bad

    # models go through the same check: a model manifest naming an absolute path is refused for the predictor
    target = tmp_path / "outside-model" / "weights.bin"
    files = {str(target): {"sha256": sha256_bytes(evil), "bytes": len(evil)}}
    model_version = new_version(sha256_bytes(json.dumps(files).encode()))
    admin.put_bytes("models", f"{name}/{model_version}/{str(target).lstrip('/')}", evil)
    manifest = {"format_version": 1, "files": files, "metrics": {}}
    admin.put_bytes("models", f"{name}/{model_version}/manifest.json", json.dumps(manifest).encode())
    out = tmp_path / "pulled"
    assert main(["models", "pull", name, model_version, "--out", str(out), "--role", "predictor"]) == 2
    assert "refusing manifest path" in capsys.readouterr().err
    assert not target.exists() and not out.exists()


# ---------------------------------------------------------------- 2
def test_committed_dataset_version_is_write_once_and_damage_is_shown(
    admin, uploader, tmp_path, request, capsys, monkeypatch
):
    name = _name(request)
    version = DatasetRegistry(uploader).push(_images(tmp_path / "a"), name)
    prefix = f"{name}/{version}"
    reg = DatasetRegistry(admin)
    committed = admin.get_bytes("datasets", f"{prefix}/manifest.json")

    # the server: the uploader may not delete what it wrote
    for key in (f"{prefix}/files/0.png", f"{prefix}/manifest.json"):
        with pytest.raises(AccessDenied):
            uploader.delete("datasets", key)

    # the client: a push into a version that exists is refused, for the uploader (which cannot look) and the admin
    monkeypatch.setattr(datasets_module, "new_version", lambda content: version)
    for store in (uploader, admin):
        with pytest.raises(RegistryError, match="write-once"):
            DatasetRegistry(store).push(_images(tmp_path / "b", count=4, size=24), name)
    monkeypatch.undo()
    assert admin.get_bytes("datasets", f"{prefix}/manifest.json") == committed
    assert reg.check(name, version) == [] and reg.versions(name) == [version]

    # damage done behind the client's back shows in `data list` and stops `data fetch` (exit 5), marked
    other = DatasetRegistry(uploader).push(_images(tmp_path / "c", count=2, size=20), name)
    bigger = io.BytesIO(b"\x89PNG" + os.urandom(3000))
    uploader.client.put_object("datasets", f"{prefix}/files/1.png", bigger, 3004)  # a raw overwrite
    admin.delete("datasets", f"{prefix}/files/2.png")  # an image lost
    rewritten = {**json.loads(committed), "count": 1}
    rewritten["files"] = {"0.png": rewritten["files"]["0.png"]}  # the manifest rewritten to hide the loss
    uploader.put_bytes("datasets", f"{name}/{other}/manifest.json", json.dumps(rewritten).encode())

    assert main(["data", "list", name]) == 0
    lines = {line.split("\t")[1]: line for line in capsys.readouterr().out.splitlines()}
    assert "damaged" in lines[version] and "damaged" in lines[other]
    problems = reg.check(name, version)
    assert any("1.png has 3004 bytes" in p for p in problems) and any(
        "2.png is missing" in p for p in problems
    )
    assert any("content hash or version id" in p for p in reg.check(name, other))

    dest = tmp_path / "copy"
    assert main(["data", "fetch", f"{name}@{version}", "--out", str(dest)]) == 5
    err = capsys.readouterr().err
    assert "damaged" in err and "2.png is missing" in err and not dest.exists()
    assert json.loads(reg.get_extra(name, version, "damaged.json"))["problems"] == problems

    # a same-size rewrite after the commit shows too (the listing's time is later than the manifest's)
    third = DatasetRegistry(uploader).push(_images(tmp_path / "d", count=2, size=20), name)
    same = admin.get_bytes("datasets", f"{name}/{third}/files/0.png")
    time.sleep(datasets_module.MTIME_SLACK_S + 1.5)
    forged = bytes(b ^ 0xFF for b in same)
    uploader.client.put_object("datasets", f"{name}/{third}/files/0.png", io.BytesIO(forged), len(forged))
    assert reg.check(name, third) == ["files/0.png was written after the commit"]


# ---------------------------------------------------------------- 3
def test_push_skips_and_names_links_that_leave_the_folder(admin, tmp_path, request, capsys):
    name = _name(request)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"private key material, not an image")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "far.png")
    folder = _images(tmp_path / "imgs", count=2)
    _images(folder / "sub", count=1)
    (folder / "leak.png").symlink_to(secret)  # leaves the folder
    (folder / "sub" / "up.png").symlink_to(Path("..") / ".." / "secret.png")  # leaves it, relatively
    (folder / "linked-dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "same.png").symlink_to(folder / "0.png")  # stays inside: pushed
    (folder / "..png").write_bytes((folder / "0.png").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    _images(folder / ".cache", count=1)

    assert main(["data", "push", str(folder), "--name", name, "--role", "uploader"]) == 0
    out, err = capsys.readouterr()
    version = out.strip().splitlines()[-1]
    skipped = {line.split(": ", 1)[0].removeprefix("skipped "): line for line in err.splitlines()}
    assert set(skipped) == {"leak.png", "sub/up.png", "linked-dir/", "..png", "notes.txt", ".cache/"}, err
    assert "leaves the folder" in skipped["leak.png"] and str(secret) in skipped["leak.png"]
    assert "leaves the folder" in skipped["sub/up.png"] and "not followed" in skipped["linked-dir/"]

    manifest = DatasetRegistry(admin).manifest(name, version)
    assert set(manifest["files"]) == {"0.png", "1.png", "same.png", "sub/0.png"}
    assert set(manifest["skipped"]) == set(skipped)
    keys = set(admin.list("datasets", f"{name}/{version}/files/"))
    assert keys == {f"{name}/{version}/files/{rel}" for rel in manifest["files"]}
    assert all(b"private key" not in admin.get_bytes("datasets", k) for k in keys)


# ---------------------------------------------------------------- 4
def test_stale_multipart_uploads_are_aborted_on_resume_and_by_prune(admin, tmp_path, request, capsys):
    name = _name(request)
    registry = ModelRegistry(admin)
    bundle = make_bundle(tmp_path / "b", seed=50, payload_mb=1)
    version = new_version(sha256_bytes((bundle / "manifest.json").read_bytes()))
    # a cut-off registration: one file landed, the big one was mid-way when the process was killed
    admin.put_file("models", f"{name}/{version}/calibration.json", bundle / "calibration.json")
    _leave_upload(admin, "models", f"{name}/{version}/weights.bin")
    assert _pending(admin, "models", f"{name}/") == [f"{name}/{version}/weights.bin"]

    assert registry.register(name, bundle).version == version  # resumed into the same version
    assert _pending(admin, "models", f"{name}/") == []

    # what a killed upload of a version that was never resumed leaves is removed by prune
    _leave_upload(admin, "models", f"{name}/20200101T000000.000Z-0badf00d/weights.bin")
    assert main(["models", "prune", name, "--keep", "5", "--stale-hours", "0"]) == 0
    assert _pending(admin, "models", f"{name}/") == [] and registry.versions(name) == [version]

    data = DatasetRegistry(admin).push(_images(tmp_path / "imgs"), name)
    _leave_upload(admin, "datasets", f"{name}/20200101T000000.000Z-0badf00d/files/big.png")
    _leave_upload(admin, "datasets", f"{name}/{data}/files/late.png")
    assert len(_pending(admin, "datasets", f"{name}/")) == 2
    assert main(["data", "prune", name, "--stale-hours", "0"]) == 0
    assert _pending(admin, "datasets", f"{name}/") == []
    assert DatasetRegistry(admin).versions(name) == [data]
    capsys.readouterr()


# ---------------------------------------------------------------- 5
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_bundle_checksum_mismatch_exits_5(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "b", seed=60)
    with open(bundle / "weights.bin", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)

    assert main(["predict", "--bundle", str(bundle), str(image)]) == 5
    assert "checksum mismatch" in capsys.readouterr().err

    proc = subprocess.run(
        [sys.executable, "-m", "tocoad.cli", "serve", "--bundle", str(bundle), "--port", str(_free_port())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "checksum mismatch" in proc.stderr


# ---------------------------------------------------------------- 12
def _key(tmp_path: Path, name: str, size: int = 32) -> Path:
    path = tmp_path / f"{name}.key"
    path.write_text(os.urandom(size).hex()[:size] + "\n")  # a Secret file often ends in a newline
    return path


def test_hole12_signed_bundles_load_only_with_their_key(tmp_path, monkeypatch, capsys):
    key_a, key_b = _key(tmp_path, "a"), _key(tmp_path, "b")
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    unsigned = make_bundle(tmp_path / "unsigned", seed=120)
    assert not (unsigned / SIGNATURE).exists()
    assert verify_bundle(unsigned)["files"]  # no key: unchanged

    monkeypatch.setenv(SIGNING_KEY_ENV, str(key_a))
    signed = make_bundle(tmp_path / "signed", seed=121)
    assert len((signed / SIGNATURE).read_text().strip()) == 64
    assert verify_bundle(signed)["files"]  # key A loads key A's bundle
    with pytest.raises(BundleSignatureError, match="is not signed"):
        verify_bundle(unsigned)

    monkeypatch.setenv(SIGNING_KEY_ENV, str(key_b))
    with pytest.raises(BundleSignatureError, match="wrong signature"):
        verify_bundle(signed)

    monkeypatch.setenv(SIGNING_KEY_ENV, str(key_a))
    manifest = json.loads((signed / MANIFEST).read_text())
    manifest["metrics"]["tocoad"]["image_auroc"] = 99.9  # checksums still match, the signature does not
    (signed / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleSignatureError, match="wrong signature"):
        verify_bundle(signed)

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", "--bundle", str(unsigned), str(image)]) == 5
    assert "is not signed" in capsys.readouterr().err
    monkeypatch.setenv(SIGNING_KEY_ENV, str(_key(tmp_path, "short", 31)))
    assert main(["predict", "--bundle", str(unsigned), str(image)]) == 2
    assert "at least 32" in capsys.readouterr().err
    with pytest.raises(SigningKeyError, match="at least 32"):
        make_bundle(tmp_path / "never", seed=122)
    monkeypatch.delenv(SIGNING_KEY_ENV)
    assert verify_bundle(signed)["files"]  # no key: a present signature is ignored


def test_hole12_signature_travels_through_the_registry(s3_server, tmp_path, monkeypatch, capsys, request):
    name = _name(request)
    reg = ModelRegistry(ArtifactStore(resolve_settings("admin"), progress=False))
    key_a, key_b = _key(tmp_path, "a"), _key(tmp_path, "b")
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    unsigned = reg.register(name, make_bundle(tmp_path / "u", seed=123)).version
    monkeypatch.setenv(SIGNING_KEY_ENV, str(key_a))
    signed = reg.register(name, make_bundle(tmp_path / "s", seed=124)).version

    pulled = reg.pull(name, signed, tmp_path / "pulled")
    assert (pulled / SIGNATURE).is_file() and verify_bundle(pulled)["files"]
    assert main(["models", "pull", name, unsigned, "--out", str(tmp_path / "u2"), "--role", "predictor"]) == 5
    assert "is not signed" in capsys.readouterr().err and not (tmp_path / "u2").exists()

    monkeypatch.setenv(SIGNING_KEY_ENV, str(key_b))
    assert main(["models", "pull", name, signed, "--out", str(tmp_path / "s2"), "--role", "predictor"]) == 5
    assert "wrong signature" in capsys.readouterr().err and not (tmp_path / "s2").exists()
    assert (
        main(["models", "pull", name, signed, "--out", str(pulled), "--role", "predictor"]) == 5
    )  # cached copy
    assert "wrong signature" in capsys.readouterr().err
