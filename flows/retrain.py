"""The retraining flow: validate → stage D → contrastive stage → memory bank → evaluate → register → compare →
promote (or not) → deploy.

Run it locally on embedded defaults (Prefect's ephemeral server, the local S3 server, the local runner)::

    tocoad flow run --dataset bottle --model bottle

Each training stage is a job (:mod:`flows.runner`) that reads from and writes to the registry; its output prefix
is its cache key (:mod:`flows.stages`), so unchanged stages are skipped and a re-run resumes after a crash.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from components.config import TocoadConfig
from components.datasets import discover
from flows.runner import StageFailed, StageSpec, make_runner
from flows.stages import output_of, plan_evaluation, plan_training
from storage.datasets import DatasetRegistry
from storage.registry import ModelRegistry, parse_s3_uri, pull_bundle
from storage.store import ArtifactStore, StoreUnavailable


class ValidationFailed(ValueError):
    """The incoming images failed validation; the message names the expectations and example files."""


def overrides_from(config: dict[str, Any] | None) -> list[str]:
    """``{"stage_d.epochs": 2}`` or ``{"stage_d": {"epochs": 2}}`` -> ``["stage_d.epochs=2"]``."""
    out = []
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            out += [f"{key}.{k}={json.dumps(v)}" for k, v in value.items()]
        else:
            out.append(f"{key}={json.dumps(value)}")
    TocoadConfig().with_overrides(out)  # fail early, with the config's own message
    return out


def _store() -> ArtifactStore:
    return ArtifactStore(progress=False)


def _transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's retry_condition_fn signature
    """Retry only what may pass on a second try: storage or API trouble, not a failed job or bad data."""
    try:
        state.result()
    except (StoreUnavailable, ConnectionError):
        return True
    except StageFailed as exc:
        return exc.transient
    except Exception:  # noqa: BLE001
        return False
    return False


# ---------------------------------------------------------------- tasks
@task(name="validate-dataset", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def validate_dataset(dataset: str, version: str, model_name: str, cfg: TocoadConfig) -> dict[str, Any]:
    """Profile and validate the dataset version's training images; store the result beside it; stop if it fails."""
    from flows.validation import validate_images

    logger = get_run_logger()
    store = _store()
    datasets = DatasetRegistry(store)
    manifest = datasets.manifest(dataset, version)
    root = datasets.fetch(dataset, version)
    data = discover(root, cfg.data.layout)
    train = [s.path.relative_to(root).as_posix() for s in data.train]
    test_sha = {manifest["files"][s.path.relative_to(root).as_posix()]["sha256"] for s in data.test}
    profile = production_profile(store, model_name)
    logger.info("validating %d training images of %s@%s (%s)", len(train), dataset, version, data.summary())
    outcome = validate_images(root, train, cfg.validation, cfg.data.image_size, profile, test_sha)
    datasets.put_extra(
        dataset, version, "validation/result.json", json.dumps(outcome.result, default=str).encode()
    )
    datasets.put_extra(
        dataset, version, "validation/summary.md", outcome.summary_markdown.encode(), "text/markdown"
    )
    state = "accepted" if outcome.success else "rejected"
    status = {"state": state, "failures": [f.problem for f in outcome.failures], "model": model_name}
    datasets.put_extra(dataset, version, "status.json", json.dumps(status).encode())
    create_markdown_artifact(
        outcome.summary_markdown,
        key=f"validation-{_slug(dataset)}",
        description=f"{dataset}@{version}: {state}",
    )
    if not outcome.success:
        raise ValidationFailed(f"dataset {dataset}@{version} was rejected: {outcome.message()}")
    return {"root": str(root), "has_test": bool(data.test) and len({s.label for s in data.test}) == 2,
            "content_sha": manifest["content_sha256"], "n_train": len(train)}  # fmt: skip


@task(name="stage", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient)
def run_stage(spec: StageSpec, runner: str) -> str:
    """Run one stage job unless its output is already committed; return the output URI."""
    logger = get_run_logger()
    out = output_of(spec)
    bucket, prefix = parse_s3_uri(out)
    marker = "metrics.json" if spec.stage == "evaluate" else "manifest.json"
    if _store().stat(bucket, f"{prefix}/{marker}") is not None:
        logger.info("stage %s: cached at %s (inputs unchanged), skipped", spec.stage, out)
        return out
    logger.info("stage %s: running %s (%s runner)", spec.stage, spec.job_name, runner)
    make_runner(runner).run(spec, lambda line: logger.info("[%s] %s", spec.stage, line))
    return out


@task(name="read-metrics", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def read_metrics(eval_uri: str) -> dict[str, Any]:
    """The ``metrics.json`` an evaluate stage wrote."""
    bucket, prefix = parse_s3_uri(eval_uri)
    return json.loads(_store().get_bytes(bucket, f"{prefix}/metrics.json"))


@task(name="register-candidate", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def register_candidate(model_name: str, bundle_uri: str, metrics: dict[str, Any] | None) -> str:
    """Register the memory-bank stage's bundle as a new version and point ``candidate`` at it."""
    store = _store()
    registry = ModelRegistry(store)
    bucket, prefix = parse_s3_uri(bundle_uri)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = pull_bundle(store, bucket, prefix, Path(tmp) / "bundle")
        info = registry.register(model_name, bundle)
    registry.set_alias(model_name, "candidate", info.version, reason="retrain flow", metrics=metrics)
    return info.version


@task(name="promote", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def promote(model_name: str, version: str, metrics: dict[str, Any] | None, reason: str) -> None:
    """Point ``production`` at the candidate."""
    ModelRegistry(_store()).set_alias(model_name, "production", version, reason=reason, metrics=metrics)


@task(name="deploy", retries=2, retry_delay_seconds=[2, 10])
def deploy(model_name: str, version: str, runner: str) -> str:
    """Roll the new production version out: reload the local predictor, or patch the InferenceService."""
    from flows.deploy import deploy_version

    uri = ModelRegistry(_store()).uri(model_name, version)
    message = deploy_version(model_name, uri, cluster=runner == "kubernetes")
    get_run_logger().info(message)
    return message


# ---------------------------------------------------------------- helpers
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


def production_profile(store: ArtifactStore, model_name: str) -> dict[str, Any] | None:
    """The training-data profile of the current production model, or None for a first model."""
    registry = ModelRegistry(store)
    record = registry.alias(model_name, "production")
    if record is None:
        return None
    manifest = registry.manifest(model_name, record["version"])
    meta = manifest["files"].get("profile.json")
    if meta is None:
        return None
    key = f"{model_name}/{record['version']}/profile.json"
    return json.loads(store.get_bytes(registry.bucket, key, sha256=meta["sha256"]))


def guard(
    candidate: dict[str, Any], production: dict[str, Any] | None, cfg: TocoadConfig
) -> tuple[bool, str]:
    """Promote only if no configured metric is worse than production's by more than the allowed points."""
    if production is None:
        return True, "no production model yet"
    worse = []
    for name in cfg.promotion.metrics:
        cand, prod = candidate["tocoad"].get(name), production["tocoad"].get(name)
        if cand is None or prod is None:
            if cfg.promotion.require_metrics:
                worse.append(f"{name} missing")
            continue
        if cand < prod - cfg.promotion.max_drop_points:
            worse.append(f"{name} {cand:.2f} < {prod:.2f} - {cfg.promotion.max_drop_points}")
    if worse:
        return False, "candidate is worse than production: " + "; ".join(worse)
    return True, f"no metric worse than production by more than {cfg.promotion.max_drop_points} points"


def _report(model_name, dataset, version, cand_v, cand_m, prod_v, prod_m, decision, reason, evals) -> str:
    names = sorted({*(cand_m or {}).get("tocoad", {}), *(prod_m or {}).get("tocoad", {})})
    rows = ["| metric | candidate | production | Δ |", "|---|---|---|---|"]
    for n in names:
        c = (cand_m or {}).get("tocoad", {}).get(n)
        p = (prod_m or {}).get("tocoad", {}).get(n)
        delta = f"{c - p:+.2f}" if c is not None and p is not None else "–"
        rows.append(
            f"| {n} | {c if c is None else f'{c:.2f}'} | {p if p is None else f'{p:.2f}'} | {delta} |"
        )
    links = "\n".join(f"- {who}: `{uri}/index.html` (`tocoad` can fetch it: metrics in `{uri}/metrics.json`)"
                      for who, uri in evals.items())  # fmt: skip
    return (
        f"# Retraining {model_name} on {dataset}@{version}\n\n"
        f"**Decision: {'promoted' if decision else 'not promoted'}** — {reason}\n\n"
        f"- candidate: `{cand_v}`\n- production before: `{prod_v or 'none'}`\n\n" + "\n".join(rows) + "\n\n"
        f"Evaluation reports:\n{links or '- none (no evaluation set)'}\n"
    )


# ---------------------------------------------------------------- the flow
@flow(name="retrain", log_prints=True)
def retrain(
    dataset: str,
    model_name: str,
    config: dict[str, Any] | None = None,
    runner: str = "local",
    dataset_version: str = "latest",
    eval_dataset: str | None = None,
    deploy_model: bool = True,
) -> dict[str, Any]:
    """Validate a dataset version, train all stages as jobs, evaluate, register, and promote if the guard allows."""
    logger = get_run_logger()
    overrides = overrides_from(config)
    cfg = TocoadConfig().with_overrides(overrides)
    store = _store()
    datasets, registry = DatasetRegistry(store), ModelRegistry(store)
    version = datasets.resolve(dataset, dataset_version)

    checked = validate_dataset(dataset, version, model_name, cfg)
    plan = plan_training(model_name, dataset, version, checked["content_sha"], overrides,
                         registry.bucket, datasets.bucket)  # fmt: skip
    for spec in plan.stages:
        run_stage(spec, runner)

    # what to compare on: the dataset's own test split, or a fixed validation set kept in the registry
    if checked["has_test"]:
        eval_uri, eval_sha = plan.dataset_uri, checked["content_sha"]
    elif eval_dataset:
        eval_version = datasets.resolve(eval_dataset, "latest")
        eval_uri = f"s3://{datasets.bucket}/{eval_dataset}/{eval_version}"
        eval_sha = datasets.manifest(eval_dataset, eval_version)["content_sha256"]
    else:
        eval_uri = eval_sha = None

    evals: dict[str, str] = {}
    cand_metrics = prod_metrics = None
    if eval_uri:
        spec = plan_evaluation(
            model_name, plan.bundle_uri, plan.stages[-1].key, eval_uri, eval_sha, registry.bucket
        )
        evals["candidate"] = run_stage(spec, runner)
        cand_metrics = read_metrics(evals["candidate"])
    cand_version = register_candidate(model_name, plan.bundle_uri, cand_metrics)

    prod = registry.alias(model_name, "production")
    prod_version = prod["version"] if prod else None
    if prod_version and eval_uri and prod_version != cand_version:
        spec = plan_evaluation(model_name, registry.uri(model_name, prod_version), prod_version, eval_uri,
                               eval_sha, registry.bucket)  # fmt: skip
        evals["production"] = run_stage(spec, runner)
        prod_metrics = read_metrics(evals["production"])

    if prod_version == cand_version:
        decision, reason = False, "the candidate is the production version already (nothing changed)"
    elif eval_uri is None:
        decision = prod_version is None
        reason = "no production model yet" if decision else "no evaluation set: promote by hand after a check"
    else:
        decision, reason = guard(cand_metrics, prod_metrics, cfg)
    logger.info("decision: %s (%s)", "promote" if decision else "keep production", reason)
    if decision:
        promote(model_name, cand_version, cand_metrics, reason)
        if deploy_model:
            deploy(model_name, cand_version, runner)

    summary = _report(model_name, dataset, version, cand_version, cand_metrics, prod_version, prod_metrics,
                      decision, reason, evals)  # fmt: skip
    create_markdown_artifact(
        summary, key=f"retrain-{_slug(model_name)}", description="candidate vs production"
    )
    if cand_metrics:
        table = [{"metric": k, "candidate": v, "production": (prod_metrics or {}).get("tocoad", {}).get(k)}
                 for k, v in cand_metrics["tocoad"].items()]  # fmt: skip
        create_table_artifact(table, key=f"metrics-{_slug(model_name)}", description="evaluation metrics")
    return {
        "dataset_version": version,
        "candidate": cand_version,
        "production_before": prod_version,
        "promoted": decision,
        "reason": reason,
        "candidate_metrics": cand_metrics,
        "production_metrics": prod_metrics,
        "stage_outputs": plan.outputs,
        "evaluations": evals,
    }
