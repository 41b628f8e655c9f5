"""The retraining flow through Prefect's real engine, the local runner and a real local S3 server."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from components.demo_data import make_demo_dataset
from flows import runner as runner_module
from flows.retrain import ValidationFailed, retrain
from storage.datasets import DatasetRegistry
from storage.registry import ModelRegistry
from storage.store import ArtifactStore

TINY = {  # every stage switched on, as in conftest.TINY
    "data.image_size": 64,
    "stage_d.enabled": True,
    "contrastive.enabled": True,
    "generator.max_scale": 3,
    "stage_d.epochs": 1,
    "stage_d.width": 16,
    "contrastive.epochs": 1,
    "contrastive.proj_dim": 32,
    "contrastive.pred_dim": 8,
    "runtime.num_workers": 0,
    "runtime.progress": False,
    "validation.min_images": 10,
}


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server on a temporary SQLite database, for the session."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def store(s3_server, prefect_server):
    return ArtifactStore(progress=False)


@pytest.fixture(scope="module")
def demo_version(store, tmp_path_factory):
    data = make_demo_dataset(tmp_path_factory.mktemp("flowdata") / "data", n_train=16, n_test_good=4,
                             n_test_defect=6, image_size=64)  # fmt: skip
    return DatasetRegistry(store).push(data, "flowdemo")


@pytest.fixture
def ran(monkeypatch):
    """Record which stages really ran (were not cached)."""
    stages: list[str] = []
    real = runner_module.LocalRunner.run

    def spy(self, spec, log):
        stages.append(spec.stage)
        return real(self, spec, log)

    monkeypatch.setattr(runner_module.LocalRunner, "run", spy)
    return stages


@pytest.fixture(scope="module")
def first_run(store, demo_version):
    return retrain("flowdemo", "flowmodel", config=TINY, dataset_version=demo_version)


def _artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_full_run_promotes_and_reports(first_run, store, demo_version):
    assert first_run["promoted"] and first_run["reason"] == "no production model yet"
    registry = ModelRegistry(store)
    assert registry.resolve("flowmodel", "production") == first_run["candidate"]
    assert first_run["candidate_metrics"]["tocoad"]["image_auroc"] > 50
    status = json.loads(DatasetRegistry(store).get_extra("flowdemo", demo_version, "status.json"))
    assert status["state"] == "accepted"
    result = json.loads(DatasetRegistry(store).get_extra("flowdemo", demo_version, "validation/result.json"))
    assert result["success"] is True
    summary = _artifacts("retrain-flowmodel")
    assert summary and "Decision: promoted" in summary[0].data and "image_auroc" in summary[0].data
    assert _artifacts("validation-flowdemo") and _artifacts("metrics-flowmodel")


def test_rerun_with_unchanged_inputs_runs_nothing(first_run, demo_version, ran):
    again = retrain("flowdemo", "flowmodel", config=TINY, dataset_version=demo_version)
    assert ran == []  # every stage and the evaluation came from the cache
    assert again["candidate"] == first_run["candidate"] and not again["promoted"]


def test_rejected_data_stops_before_any_job(store, tmp_path, ran):
    folder = tmp_path / "bad" / "train" / "good"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"ok_{i}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (folder / "dup.png").write_bytes((folder / "ok_0.png").read_bytes())
    Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(folder / "wrong_size.png")
    Image.new("RGB", (64, 64)).save(folder / "black.png")
    version = DatasetRegistry(store).push(tmp_path / "bad", "baddata")
    with pytest.raises(ValidationFailed) as info:
        retrain("baddata", "badmodel", config=TINY, dataset_version=version)
    message = str(info.value)
    for name in ("corrupt.png", "dup.png", "wrong_size.png", "black.png"):
        assert name in message
    assert ran == []
    assert list(store.list("models", "badmodel/")) == []
    assert (
        json.loads(DatasetRegistry(store).get_extra("baddata", version, "status.json"))["state"] == "rejected"
    )


def test_killed_stage_fails_the_run_and_a_rerun_resumes(store, demo_version, monkeypatch, ran):
    # other cache keys than the first run, and a stage c long enough (~10 s) to be cut off by a 5 s deadline on an
    # idle machine too (with 2 epochs it finished and committed its output within the deadline)
    config = {**TINY, "contrastive.epochs": 30}
    spy = runner_module.LocalRunner.run  # the `ran` fixture's recorder

    def kill_contrastive(self, spec, log):
        if spec.stage == "c":  # the real job is killed by its deadline part-way through
            spec = dataclasses.replace(spec, deadline_s=5)
        return spy(self, spec, log)

    monkeypatch.setattr(runner_module.LocalRunner, "run", kill_contrastive)
    with pytest.raises(runner_module.StageFailed, match="stage c"):
        retrain("flowdemo", "resumemodel", config=config, dataset_version=demo_version)
    assert ran == ["d", "c"]
    monkeypatch.setattr(runner_module.LocalRunner, "run", spy)
    ran.clear()
    result = retrain("flowdemo", "resumemodel", config=config, dataset_version=demo_version)
    assert ran == ["c", "bank", "evaluate"]  # stage D came from the cache
    assert result["promoted"]


def test_worse_candidate_is_registered_but_not_promoted(first_run, store, demo_version):
    worse = {**TINY, "bank.coreset_ratio": 0.0005}  # a memory bank of a handful of patches
    result = retrain("flowdemo", "flowmodel", config=worse, dataset_version=demo_version)
    registry = ModelRegistry(store)
    assert not result["promoted"] and "worse than production" in result["reason"]
    assert result["candidate"] in registry.versions("flowmodel")
    assert registry.resolve("flowmodel", "candidate") == result["candidate"]
    assert registry.resolve("flowmodel", "production") == first_run["candidate"]
