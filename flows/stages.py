"""The stage plan: what each training stage reads and writes in the registry, and its cache key.

Every stage's output lives under an S3 prefix named by a hash of its inputs (dataset content, full config, tocoad
version, upstream key), so a stage whose inputs did not change is not run again, and a flow re-run after a crash
resumes at the first stage without a committed output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata

from components.config import TocoadConfig
from flows.runner import StageSpec

TRAIN_STAGES = ("d", "c", "bank")


def _key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def _version() -> str:
    try:
        return metadata.version("tocoad")
    except metadata.PackageNotFoundError:
        return "dev"


@dataclass(frozen=True)
class Plan:
    """Stage specs for one training run and the URIs they produce."""

    model_name: str
    models_bucket: str
    dataset_uri: str
    stages: tuple[StageSpec, ...]
    outputs: dict[str, str]  # stage -> s3 URI

    @property
    def bundle_uri(self) -> str:
        """The memory-bank stage's output: the candidate model bundle."""
        return self.outputs["bank"]


def trains(cfg: TocoadConfig, stage: str) -> bool:
    """Whether ``stage`` trains a network under ``cfg`` (and so gets a GPU); a switched-off stage only passes its
    input on, which takes seconds on a CPU node."""
    if stage == "d":
        return cfg.stage_d.enabled and cfg.stage_d.epochs > 0
    if stage == "c":
        c = cfg.contrastive
        return c.enabled and (c.adaptor_epochs if c.mode == "adaptor" else c.epochs) > 0
    return False


def plan_training(
    model_name: str,
    dataset: str,
    dataset_version: str,
    dataset_sha: str,
    overrides: list[str],
    models_bucket: str = "models",
    datasets_bucket: str = "datasets",
) -> Plan:
    """The three training stages (D, contrastive, memory bank), chained by their cache keys."""
    cfg = TocoadConfig().with_overrides(overrides)
    cfg_text = cfg.to_yaml()
    data_uri = f"s3://{datasets_bucket}/{dataset}/{dataset_version}"
    sets = tuple(arg for item in overrides for arg in ("--set", item))
    key, previous, specs, outputs = dataset_sha, None, [], {}
    for stage in TRAIN_STAGES:
        key = _key(stage, key, cfg_text, _version())
        out = f"s3://{models_bucket}/{model_name}/_stages/{stage}/{key}"
        argv = ("train", "--stage", stage, "--data", data_uri, "--out", out, *sets)
        if previous:
            argv += ("--from", previous)
        specs.append(StageSpec(stage, argv, key, model_name, gpus=1 if trains(cfg, stage) else 0))
        outputs[stage], previous = out, out
    return Plan(model_name, models_bucket, data_uri, tuple(specs), outputs)


def plan_evaluation(model_name: str, bundle_uri: str, bundle_id: str, eval_uri: str, eval_sha: str,
                    models_bucket: str = "models") -> StageSpec:  # fmt: skip
    """Evaluate one bundle (``bundle_id``: its cache key or version) on one labelled dataset version."""
    key = _key("evaluate", bundle_id, eval_sha, _version())
    out = f"s3://{models_bucket}/{model_name}/_evals/{key}"
    argv = ("evaluate", "--bundle", bundle_uri, "--data", eval_uri, "--out", out, "--quiet")
    return StageSpec("evaluate", argv, key, model_name, gpus=0, memory="8Gi")


def output_of(spec: StageSpec) -> str:
    """The ``--out`` URI of a stage spec."""
    return spec.argv[spec.argv.index("--out") + 1]
