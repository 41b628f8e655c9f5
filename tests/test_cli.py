"""The command line end to end on a tiny generated data set: train (all stages and stage by stage), evaluate,
predict, and clear errors for bad input."""

import json
import subprocess
import sys

import pytest
from conftest import TINY  # the tiny training settings shared by the tests

from components.demo_data import make_demo_dataset
from components.pipeline import load_artifacts
from tocoad.cli import main


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root / "data", n_train=12, n_test_good=4, n_test_defect=6, image_size=64)


@pytest.fixture(scope="module")
def bundle(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    assert main(["train", "--data", str(demo), "--out", str(out), *_sets(TINY)]) == 0
    return out


def test_train_writes_a_complete_bundle(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["stages"] == ["d", "c", "bank"]
    assert {
        "discriminator.safetensors",
        "feature_extractor.safetensors",
        "heads.safetensors",
        "index.faiss",
        "memory_bank.safetensors",
        "calibration.json",
        "profile.json",
        "config.yaml",
    } <= set(manifest["files"])
    assert manifest["config"]["data"]["image_size"] == 64 and len(manifest["data_fingerprint"]) == 64
    assert set(manifest["history"]) == {"d", "c"}
    assert set(manifest["metrics"]["stage_seconds"]) == {"d", "c", "bank"}
    profile = json.loads((bundle / "profile.json").read_text())
    assert {"brightness", "contrast", "sharpness"} == set(profile["image_stats"])


def test_evaluate_writes_metrics_and_report(bundle, demo, tmp_path, capsys):
    assert (
        main(["evaluate", "--bundle", str(bundle), "--data", str(demo), "--out", str(tmp_path), "--quiet"])
        == 0
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        assert 0 <= metrics["tocoad"][key] <= 100
    assert "pixel_auroc" in metrics["discriminator"]
    assert (tmp_path / "index.html").is_file()
    out, at = capsys.readouterr().out, metrics["tocoad"]
    assert "report:" in out and metrics["n_defective"] == 6 and metrics["n_test"] == 10
    assert (
        f"at the threshold: {6 - at['misses_at_threshold']} of 6 defective images found, "
        f"{at['false_alarms_at_threshold']} false alarm(s) among 4 good images"
    ) in out  # the confusion counts at the threshold


def test_predict_matches_in_process_model(bundle, demo, tmp_path, capsys):
    images = sorted((demo / "test").rglob("*.png"))[:3]
    assert (
        main(["predict", "--bundle", str(bundle), "--json", "--heatmaps", str(tmp_path), *map(str, images)])
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 3 and all(r["label"] in ("normal", "defective") for r in results)
    assert all(0 <= r["normalized"] <= 1 for r in results)
    assert all((tmp_path / f"{p.stem}_heatmap.png").is_file() for p in images)
    threshold = load_artifacts(bundle).calibration.threshold
    assert all((r["score"] >= threshold) == (r["label"] == "defective") for r in results)


def test_heatmaps_keep_sub_folders_so_equal_names_never_collide(bundle, demo, tmp_path, capsys):
    images = [demo / "test" / kind / "000.png" for kind in ("good", "hole", "scratch")]
    images.append(images[1])  # the same file twice gets a second name, not the first one overwritten
    out = tmp_path / "maps"
    assert (
        main(["predict", "--bundle", str(bundle), "--json", "--heatmaps", str(out), *map(str, images)]) == 0
    )
    written = [r["heatmap"] for r in json.loads(capsys.readouterr().out)]
    expected = [out / "good/000_heatmap.png", out / "hole/000_heatmap.png", out / "scratch/000_heatmap.png",
                out / "hole/000_heatmap_2.png"]  # fmt: skip
    assert written == [str(p) for p in expected] and all(p.is_file() for p in expected)
    assert len({p.read_bytes() for p in expected[:3]}) == 3
    assert main(["predict", "--bundle", str(bundle), "--heatmaps", str(out), *map(str, images[:2])]) == 0
    assert "replacing 2 existing heatmap(s)" in capsys.readouterr().err  # a re-run says that it overwrites


def test_serve_on_a_missing_bundle_fails_at_once(tmp_path):
    missing = tmp_path / "no-such-bundle"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tocoad.cli", "serve", "--bundle", str(missing)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2  # README: bad input exits 2
    assert f"--bundle {missing}: the path does not exist" in proc.stderr and "Traceback" not in proc.stderr
    # it failed before importing the server stack (-X importtime lists every import on stderr)
    assert "kserve" not in proc.stderr and "torch" not in proc.stderr


def test_stage_by_stage_equals_a_chain(demo, tmp_path):
    d, c, b = tmp_path / "d", tmp_path / "c", tmp_path / "b"
    assert main(["train", "--stage", "d", "--data", str(demo), "--out", str(d), *_sets(TINY)]) == 0
    assert load_artifacts(d).stages == ["d"]
    assert main(["train", "--stage", "c", "--data", str(demo), "--from", str(d), "--out", str(c)]) == 0
    assert main(["train", "--stage", "bank", "--data", str(demo), "--from", str(c), "--out", str(b)]) == 0
    art = load_artifacts(b)
    assert art.stages == ["d", "c", "bank"] and art.bank is not None and art.disc is not None


def test_stage_refuses_changed_earlier_settings(demo, tmp_path, capsys):
    d = tmp_path / "d"
    assert main(["train", "--stage", "d", "--data", str(demo), "--out", str(d), *_sets(TINY)]) == 0
    changed = _sets([*TINY, "stage_d.epochs=2"])
    code = main(
        [
            "train",
            "--stage",
            "c",
            "--data",
            str(demo),
            "--from",
            str(d),
            "--out",
            str(tmp_path / "c"),
            *changed,
        ]
    )
    assert code == 2 and "stage_d" in capsys.readouterr().err


def test_bad_input_gives_a_clear_error_without_traceback(tmp_path, bundle):
    cases = [
        (["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "nowhere"),
        (
            ["train", "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--set", "bank.nope=1"],
            "no setting",
        ),
        (["evaluate", "--bundle", str(tmp_path), "--data", str(tmp_path)], "not a model bundle"),
        (["predict", "--bundle", str(bundle), str(tmp_path / "missing.png")], "missing.png"),
    ]
    for args, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "tocoad.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_tampered_bundle_is_refused(bundle, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "index.faiss", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    assert (
        main(["predict", "--bundle", str(copy), str(next((bundle.parent).glob("*")))]) == 5
    )  # README: a checksum mismatch exits 5
    assert "checksum mismatch" in capsys.readouterr().err
