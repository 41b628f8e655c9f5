"""Bundle files: atomic creation, checksum verification, tamper detection."""

import json

import pytest
import torch

from components.bundle import BundleError, load_tensors, save_tensors, verify_bundle, write_bundle


def _populate(tmp):
    save_tensors(tmp / "w.safetensors", {"a": torch.arange(6.0).view(2, 3)})
    (tmp / "notes.json").write_text("{}")


def test_round_trip_and_manifest(tmp_path):
    out = write_bundle(tmp_path / "b", _populate, {"stages": ["d"]})
    manifest = verify_bundle(out)
    assert set(manifest["files"]) == {"w.safetensors", "notes.json"}
    assert manifest["stages"] == ["d"] and "torch" in manifest["packages"]
    assert torch.equal(load_tensors(out / "w.safetensors")["a"], torch.arange(6.0).view(2, 3))


def test_tampering_is_detected(tmp_path):
    out = write_bundle(tmp_path / "b", _populate, {})
    (out / "notes.json").write_text('{"x": 1}')
    with pytest.raises(BundleError, match="checksum mismatch.*notes.json"):
        verify_bundle(out)
    (out / "notes.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(out)


def test_same_size_tampering_is_detected(tmp_path):
    out = write_bundle(tmp_path / "b", _populate, {})
    data = bytearray((out / "w.safetensors").read_bytes())
    data[-1] ^= 0xFF  # flip one byte of a tensor, keeping the size
    (out / "w.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch.*w.safetensors"):
        verify_bundle(out)


def test_failed_write_leaves_nothing_visible(tmp_path):
    def crash(tmp):
        _populate(tmp)
        raise RuntimeError("job crashed")

    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "b", crash, {})
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_is_kept_unless_overwrite(tmp_path):
    out = write_bundle(tmp_path / "b", _populate, {"v": 1})
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(out, _populate, {"v": 2})
    write_bundle(out, _populate, {"v": 2}, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        verify_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify_bundle(tmp_path)
