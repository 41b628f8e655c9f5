"""The S3 store, the model and dataset registries and the local server, against a real SeaweedFS server."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.bundle import verify_bundle, write_bundle
from storage import store as store_module
from storage.datasets import DatasetRegistry
from storage.registry import ModelRegistry, RegistryError
from storage.settings import resolve_settings
from storage.store import AccessDenied, ArtifactStore, ChecksumError, StoreUnavailable
from tocoad.cli import main


def make_bundle(path: Path, seed: int, payload_mb: float = 0.1, auroc: float = 90.0) -> Path:
    """A small bundle of random bytes (the registry does not care what the files hold)."""
    rng = np.random.default_rng(seed)

    def populate(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(rng.bytes(int(payload_mb * 2**20)))
        (tmp / "calibration.json").write_text(json.dumps({"threshold": float(rng.random())}))

    return write_bundle(path, populate, {"metrics": {"tocoad": {"image_auroc": auroc}}, "stages": ["bank"]})


@pytest.fixture
def store(s3_server):
    return ArtifactStore(resolve_settings("admin"), progress=False)


@pytest.fixture
def registry(store):
    return ModelRegistry(store)


def _name(request) -> str:
    return request.node.name.replace("_", "-").lower()[:60]


def test_object_of_100_mb_round_trips(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(100 * 2**20))
    info = store.put_file("models", "big/object.bin", src)
    assert store.stat("models", "big/object.bin").sha256 == info.sha256
    out = store.get_file("models", "big/object.bin", tmp_path / "back.bin")
    assert out.sha256 == info.sha256 and (tmp_path / "back.bin").stat().st_size == 100 * 2**20
    store.delete("models", "big/object.bin")
    assert store.stat("models", "big/object.bin") is None


def test_bundle_round_trips_with_every_checksum(registry, tmp_path, request):
    name = _name(request)
    bundle = make_bundle(tmp_path / "b", seed=1, payload_mb=3)
    info = registry.register(name, bundle, alias="candidate")
    assert registry.versions(name) == [info.version]
    for rel, meta in info.manifest["files"].items():
        assert registry.store.stat("models", f"{name}/{info.version}/{rel}").sha256 == meta["sha256"]
    pulled = registry.pull(name, "candidate", tmp_path / "pulled")
    assert verify_bundle(pulled)["files"] == verify_bundle(bundle)["files"]
    assert registry.register(name, bundle).version == info.version  # idempotent
    with pytest.raises(RegistryError, match="no production"):
        registry.resolve(name, "production")


def test_eight_concurrent_registrations_all_land(registry, tmp_path, request):
    name = _name(request)
    bundles = [make_bundle(tmp_path / f"b{i}", seed=10 + i, payload_mb=2) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda b: registry.register(name, b), bundles))
    assert sorted(i.version for i in infos) == registry.versions(name)
    assert len(set(registry.versions(name))) == 8
    for i, info in enumerate(infos):
        pulled = registry.pull(name, info.version, tmp_path / f"p{i}")
        assert (pulled / "weights.bin").read_bytes() == (bundles[i] / "weights.bin").read_bytes()


def test_cut_off_upload_is_invisible_and_can_be_resumed(registry, s3_server, tmp_path, request, monkeypatch):
    name = _name(request)
    good = registry.register(name, make_bundle(tmp_path / "good", seed=2), alias="production")
    big = make_bundle(tmp_path / "big", seed=3, payload_mb=48)

    sent = {"bytes": 0}
    real_read = store_module._HashingReader.read

    def read_then_kill(self, n=-1):  # the real server dies after ~20 MB of a 48 MB upload
        data = real_read(self, n)
        sent["bytes"] += len(data)
        if sent["bytes"] > 20 * 2**20 and s3_server.status() is not None:
            s3_server.kill()
        return data

    monkeypatch.setattr(store_module._HashingReader, "read", read_then_kill)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        registry.register(name, big)
    monkeypatch.setattr(store_module._HashingReader, "read", real_read)
    s3_server.up()

    assert registry.versions(name) == [good.version]  # the partial version is not listed
    assert registry.resolve(name, "production") == good.version
    partial = registry._partial_versions(name)
    assert len(partial) == 1
    resumed = registry.register(name, big)
    assert resumed.version in partial  # resumed into the same version, not a new one
    assert registry.versions(name) == sorted([good.version, resumed.version])
    verify_bundle(registry.pull(name, resumed.version, tmp_path / "pulled"))
    assert registry.resolve(name, "production") == good.version


def test_tampered_object_is_refused(registry, tmp_path, request):
    name = _name(request)
    info = registry.register(name, make_bundle(tmp_path / "b", seed=4))
    key = f"{name}/{info.version}/weights.bin"
    forged = info.manifest["files"]["weights.bin"]["sha256"]  # keep the recorded hash, change the bytes
    data = b"x" * 1000
    registry.store.client.put_object("models", key, io.BytesIO(data), len(data), metadata={"sha256": forged})
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        registry.pull(name, info.version, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()  # nothing half-pulled is left behind


def test_identities_are_least_privilege(registry, s3_server, tmp_path, request):
    name = _name(request)
    info = registry.register(name, make_bundle(tmp_path / "b", seed=5), alias="production")
    predictor = ModelRegistry(ArtifactStore(resolve_settings("predictor"), progress=False))
    uploader = ArtifactStore(resolve_settings("uploader"), progress=False)

    verify_bundle(predictor.pull(name, "production", tmp_path / "pulled"))  # it can read models
    with pytest.raises(AccessDenied):
        predictor.store.put_bytes("models", f"{name}/{info.version}/evil.json", b"{}")
    with pytest.raises(AccessDenied):
        predictor.store.delete("models", f"{name}/{info.version}/manifest.json")
    with pytest.raises(AccessDenied):
        predictor.promote(name, info.version)
    with pytest.raises(AccessDenied):
        predictor.store.get_bytes("datasets", "x/y")
    assert registry.versions(name) == [info.version]

    with pytest.raises(AccessDenied):
        uploader.get_bytes("models", f"{name}/{info.version}/manifest.json")
    with pytest.raises(AccessDenied):
        uploader.put_bytes("models", f"{name}/{info.version}/evil.json", b"{}")
    with pytest.raises(AccessDenied):
        list(uploader.list("datasets"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "a.png")
    version = DatasetRegistry(uploader).push(folder, "from-camera")  # but it can push datasets
    assert DatasetRegistry(registry.store).manifest("from-camera", version)["count"] == 1


def test_aliases_are_atomic_under_load(registry, tmp_path, request):
    name = _name(request)
    versions = [
        registry.register(name, make_bundle(tmp_path / f"b{i}", seed=20 + i)).version for i in range(3)
    ]
    registry.promote(name, versions[0])
    reader = ModelRegistry(ArtifactStore(resolve_settings("predictor"), progress=False))
    seen, problems, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                info = reader.info(name, "production")
                if info.manifest["files"] is None:
                    problems.append("manifest without files")
                seen.append(info.version)
            except Exception as exc:  # noqa: BLE001 - any failure is a finding
                problems.append(repr(exc))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for i in range(50):
            registry.promote(name, versions[(i + 1) % 3], reason=f"round {i}")
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert len(seen) > 20 and set(seen) <= set(versions) and len(set(seen)) >= 2
    assert len(registry.history(name, "production")) == 51


def test_rollback_history_and_retention(registry, tmp_path, request):
    name = _name(request)
    v = [
        registry.register(name, make_bundle(tmp_path / f"b{i}", seed=30 + i, auroc=80 + i)).version
        for i in range(5)
    ]
    registry.promote(name, v[0], reason="first")
    registry.promote(name, v[1], reason="better")
    rec = registry.rollback(name)
    assert rec["version"] == v[0] and rec["previous"] == v[1]
    hist = registry.history(name, "production")
    assert [h["reason"] for h in hist] == ["first", "better", "rollback"]
    assert hist[1]["metrics"] == {"tocoad": {"image_auroc": 81.0}} and hist[0]["by"]
    registry.set_alias(name, "candidate", v[2])
    deleted = registry.prune(name, keep=1)
    assert sorted(deleted) == [v[1], v[3]]
    assert registry.versions(name) == [v[0], v[2], v[4]]  # production, candidate, newest
    with pytest.raises(RegistryError, match="no committed version"):
        registry.promote(name, v[1])


def test_dataset_push_is_immutable_and_fetches_verified(store, tmp_path, request):
    name = _name(request)
    folder = tmp_path / "imgs"
    (folder / "train" / "good").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 12), (i * 40, 0, 0)).save(folder / "train" / "good" / f"{i}.png")
    (folder / "train" / "good" / "broken.png").write_bytes(b"not a png")
    reg = DatasetRegistry(store)
    version = reg.push(folder, name)
    manifest = reg.manifest(name, version)
    assert manifest["count"] == 4 and manifest["files"]["train/good/0.png"]["shape"] == [12, 16, 3]
    assert manifest["files"]["train/good/broken.png"]["shape"] is None
    local = reg.fetch(name, "latest", tmp_path / "copy")
    assert (local / "train" / "good" / "2.png").read_bytes() == (
        folder / "train" / "good" / "2.png"
    ).read_bytes()
    # an uncommitted version (no manifest) is not listed
    store.put_bytes("datasets", f"{name}/20990101T000000Z-deadbeef/files/x.png", b"x")
    assert reg.versions(name) == [version]


def test_local_server_restarts_with_its_data(s3_server, store):
    store.put_bytes("models", "restart/probe.json", b'{"alive": true}')
    endpoint = s3_server.status()["endpoint"]
    s3_server.down()
    assert s3_server.status() is None
    assert s3_server.up()["endpoint"] == endpoint
    assert store.get_bytes("models", "restart/probe.json") == b'{"alive": true}'
    assert stat.S_IMODE(s3_server.credentials_file.stat().st_mode) == 0o600


def test_cli_data_and_models_commands(s3_server, tmp_path, capsys, request):
    name = _name(request)
    folder = tmp_path / "imgs"
    for rel in ("train/good/a.png", "test/bad/b.png", "ground_truth/bad/b_mask.png"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / rel)
    assert main(["data", "push", str(folder), "--name", name, "--role", "uploader"]) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["data", "list", name]) == 0
    assert f"{version}\t2 images, 1 masks\t" in capsys.readouterr().out  # a mask is not counted as an image

    reg = ModelRegistry(ArtifactStore(progress=False))
    a = reg.register(name, make_bundle(tmp_path / "a", seed=40)).version
    b = reg.register(name, make_bundle(tmp_path / "b", seed=41), alias="candidate").version
    assert main(["models", "promote", name, a]) == 0
    assert main(["models", "promote", name]) == 0  # the candidate
    assert main(["models", "list", name]) == 0
    out = capsys.readouterr().out
    assert f"{name}\t{b}\tproduction,candidate" in out
    assert main(["models", "rollback", name]) == 0
    assert main(["models", "show", name]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["version"] == a and [h["reason"] for h in shown["history"]][-1] == "rolled back by hand"
    assert main(["models", "pull", name, "--out", str(tmp_path / "pulled"), "--role", "predictor"]) == 0
    verify_bundle(tmp_path / "pulled")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_and_pulled_bundles_follow_the_umask(s3_server, registry, tmp_path, request, umask):
    name = _name(request).replace("[", "-").replace("]", "")
    previous = os.umask(umask)
    try:
        bundle = make_bundle(tmp_path / "written", seed=43)
        version = registry.register(name, bundle).version
        pulled = registry.pull(name, version, tmp_path / "pulled")
    finally:
        os.umask(previous)
    for folder in (bundle, pulled):  # not tempfile.mkdtemp's 700 whatever the umask
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert not list(tmp_path.glob(".*"))  # no partial folder left beside them


def test_models_show_says_an_unknown_model_does_not_exist(s3_server, registry, tmp_path, capsys, request):
    name = _name(request)
    registry.register(name, make_bundle(tmp_path / "a", seed=42))
    for ref in ("production", "latest", "20260101T000000.000Z-00000000"):
        assert main(["models", "show", f"{name}-typo", ref]) == 2  # README: bad input exits 2
        err = capsys.readouterr().err
        assert f"model {name}-typo does not exist" in err and "production version yet" not in err
        known = err.split("known models: ", 1)[1].strip().split(", ")
        assert name in known and f"{name}-typo" not in known
    assert main(["models", "show", name]) == 2  # the model exists but nothing is promoted: that is said
    assert f"model {name} has no production version yet" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "code", "message"),
    [
        ({"TOCOAD_S3_ENDPOINT": "http://127.0.0.1:9", "TOCOAD_S3_ACCESS_KEY": "a", "TOCOAD_S3_SECRET_KEY": "b",
          "TOCOAD_S3_RETRIES": "2"}, 3, "unreachable"),
        ({"TOCOAD_S3_ENDPOINT": "http://127.0.0.1:9"}, 2, "credentials are not"),
        ({"TOCOAD_S3_ENDPOINT": "ftp://x"}, 2, "not a URL"),
        ({"TOCOAD_MODELS_BUCKET": "no-such-bucket"}, 2, "does not exist"),
        ({"TOCOAD_S3_ROLE": "root"}, 2, "TOCOAD_S3_ROLE"),
    ],
)  # fmt: skip
def test_bad_storage_settings_give_clear_errors(s3_server, monkeypatch, capsys, env, code, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["models", "list"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_wrong_credentials_give_exit_code_4(s3_server, monkeypatch, capsys):
    endpoint = s3_server.status()["endpoint"]
    monkeypatch.setenv("TOCOAD_S3_ENDPOINT", f"http://{endpoint}")
    monkeypatch.setenv("TOCOAD_S3_ACCESS_KEY", "tocoad-admin-wrong")
    monkeypatch.setenv("TOCOAD_S3_SECRET_KEY", "wrong-secret")
    assert main(["models", "list"]) == 4
    assert "access denied" in capsys.readouterr().err


def test_train_from_a_registry_dataset_to_the_registry(s3_server, tmp_path, capsys, request):
    """A real (tiny) model: data pushed to S3, trained from there, registered, pulled back, same predictions."""
    from test_cli import TINY, _sets

    from components.demo_data import make_demo_dataset
    from components.pipeline import load_artifacts
    from components.predict import score_images

    name = _name(request)
    data = make_demo_dataset(tmp_path / "data", n_train=8, n_test_good=2, n_test_defect=2, image_size=64)
    assert main(["data", "push", str(data), "--name", name]) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    uri = f"s3://datasets/{name}/{version}"
    assert (
        main(["train", "--data", uri, "--to-registry", name, "--out", str(tmp_path / "b"), *_sets(TINY)]) == 0
    )
    assert f"registered candidate: s3://models/{name}/" in capsys.readouterr().out
    reg = ModelRegistry(ArtifactStore(progress=False))
    pulled = reg.pull(name, "candidate", tmp_path / "pulled")
    local, remote = load_artifacts(tmp_path / "b").model(), load_artifacts(pulled).model()
    images = list(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    assert score_images(local, images) == score_images(remote, images)
    assert reg.info(name, "candidate").manifest["data_fingerprint"]
