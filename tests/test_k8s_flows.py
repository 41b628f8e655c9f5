"""Prefect on Kubernetes, offline: k8s/prefect manifests, the work-pool template rendered as the worker does,
the stage Jobs, the KubernetesRunner (against a fake API: no cluster runs here) and prefect.yaml."""

from __future__ import annotations

import copy
import http.server
import json
import os
import threading
import urllib.parse
import uuid
import zoneinfo
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import kubernetes_validate
    import prefect  # noqa: F401
    import prefect_kubernetes  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip(
        "kubernetes-validate, prefect or prefect-kubernetes is not installed", allow_module_level=True
    )

import urllib3
from k8s_util import K8S_VERSIONS, REPO, kubernetes_validate
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect_kubernetes.worker import KubernetesWorker
from pydantic import ValidationError

from flows.k8s_jobs import JobSettings, KubernetesRunner, render_stage_job
from flows.k8s_render import render_flow_run_job
from flows.runner import StageFailed, StageSpec, make_runner

PREFECT_DIR = REPO / "k8s" / "prefect"
TEMPLATE = PREFECT_DIR / "base-job-template.json"
IMAGE = "ghcr.io/tocoad/tocoad-train:0.1.0"


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _docs() -> list[dict[str, Any]]:
    """Every document of every resource file of ``k8s/prefect``."""
    return [
        doc
        for name in _load(PREFECT_DIR / "kustomization.yaml")[0]["resources"]
        for doc in _load(PREFECT_DIR / name)
    ]


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _validate(doc: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def _template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text())


def _flow_run() -> tuple[FlowRun, DeploymentResponse, Flow]:
    """A flow run of the nightly deployment, as the worker would read them from the API."""
    flow = Flow(id=uuid.uuid4(), name="retrain")
    deployment = DeploymentResponse(id=uuid.uuid4(), name="retrain-nightly", flow_id=flow.id)
    run = FlowRun(id=uuid.uuid4(), name="silly-otter", flow_id=flow.id, deployment_id=deployment.id)
    return run, deployment, flow


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


# --- k8s/prefect manifests ---------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_root_lists_prefect():
    listed = _load(PREFECT_DIR / "kustomization.yaml")[0]["resources"]
    on_disk = {p.name for p in PREFECT_DIR.iterdir() if p.suffix in (".yaml", ".yml")} - {
        "kustomization.yaml"
    }
    assert set(listed) == on_disk and len(listed) == len(on_disk)
    assert "prefect" in _load(REPO / "k8s" / "kustomization.yaml")[0]["resources"]


def test_manifests_pass_strict_validation():
    docs = _docs()
    kinds = {d["kind"] for d in docs}
    assert kinds >= {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    }
    for doc in docs:
        assert doc["metadata"]["namespace"] == "tocoad", doc["metadata"]["name"]
        _validate(doc)


@pytest.mark.parametrize("name", ["prefect-server", "prefect-worker"])
def test_deployments_are_hardened_and_pinned(name):
    deployment = _one("Deployment", name)
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = _container(deployment)
    assert container["image"].startswith("prefecthq/prefect:3.9.1-python3.11")
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_server_database_probes_and_service():
    server = _one("Deployment", "prefect-server")
    assert server["spec"]["strategy"]["type"] == "Recreate"  # one SQLite file on a ReadWriteOnce volume
    container = _container(server)
    assert container["image"] == "prefecthq/prefect:3.9.1-python3.11"
    assert container["args"][:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == "sqlite+aiosqlite:////data/prefect.db"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/api/health", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 4200}
    service = _one("Service", "prefect-server")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(4200, "http")]
    assert service["spec"]["selector"].items() <= server["spec"]["template"]["metadata"]["labels"].items()


def test_worker_joins_the_pool():
    worker = _one("Deployment", "prefect-worker")
    pod = worker["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "prefect-worker"
    container = _container(worker)
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == "tocoad-k8s" and args[args.index("--type") + 1] == "kubernetes"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert (
        env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == "tocoad"
    )  # a namespaced Role suffices


def _rules(role: str) -> dict[tuple[str, str], set[str]]:
    return {
        (group, resource): set(rule["verbs"])
        for rule in _one("Role", role)["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def test_rbac():
    job_verbs = {"create", "get", "list", "watch", "delete", "patch"}
    for role in ("prefect-worker", "tocoad-flow-runner"):
        rules = _rules(role)
        assert rules[("batch", "jobs")] == job_verbs
        assert rules[("", "pods")] == {"get", "list", "watch"}
        assert rules[("", "pods/log")] == {"get"}
        assert {"get", "list", "watch"} <= rules[("", "events")]
        binding = _one("RoleBinding", role)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": role, "namespace": "tocoad"}]
        _one("ServiceAccount", role)
    assert _rules("tocoad-flow-runner")[("serving.kserve.io", "inferenceservices")] == {"get", "patch"}
    assert ("serving.kserve.io", "inferenceservices") not in _rules("prefect-worker")
    stage_sa = _one("ServiceAccount", "tocoad-stage-job")
    assert stage_sa["automountServiceAccountToken"] is False
    bound = {s["name"] for d in _docs() if d["kind"] == "RoleBinding" for s in d["subjects"]}
    assert "tocoad-stage-job" not in bound


# --- the work pool's base job template, rendered as the worker renders it ----------------------------


def test_template_is_a_valid_work_pool_template():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools.validation import is_valid_schema

    template = _template()
    validate_base_job_template(template)  # what the server checks on `prefect work-pool create`
    is_valid_schema(template["variables"], preprocess=False)
    props = template["variables"]["properties"]
    assert props["namespace"]["default"] == "tocoad"
    assert props["image"]["default"] == IMAGE
    assert props["service_account_name"]["default"] == "tocoad-flow-runner"
    for name in ("cpu_request", "memory_request", "memory_limit", "gpu_count"):
        assert isinstance(props[name]["default"], str), name
    assert props["gpu_count"]["type"] == "string" and props["gpu_count"]["default"] == "0"


@pytest.mark.parametrize("values", [{}, {"image": "ghcr.io/tocoad/tocoad-train:0.2.0", "gpu_count": "1"}])
def test_rendered_flow_run_job_passes_strict_validation(values):
    run, deployment, flow = _flow_run()
    job = render_flow_run_job(_template(), values, run, deployment, flow)
    _validate(job)
    assert job["metadata"]["namespace"] == "tocoad" and job["metadata"]["generateName"] == "silly-otter-"
    assert job["metadata"]["labels"]["prefect.io/flow-run-id"] == str(run.id)
    assert job["spec"]["parallelism"] == 1 and job["spec"]["completions"] == 1
    pod = job["spec"]["template"]["spec"]
    assert "parallelism" not in pod and "completions" not in pod
    assert pod["serviceAccountName"] == "tocoad-flow-runner" and pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = _container(job)
    image = values.get("image", IMAGE)
    assert container["image"] == image
    assert container["command"] == ["/usr/bin/env"]  # the image's ENTRYPOINT is `tocoad`
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["envFrom"] == [{"secretRef": {"name": "tocoad-s3-admin"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["TOCOAD_RUNNER"]["value"] == "kubernetes"
    assert env["TOCOAD_JOB_IMAGE"]["value"] == image  # stage Jobs run the flow pod's image
    assert env["TOCOAD_K8S_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(run.id)
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == values.get("gpu_count", "0")
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "512Mi"}
    assert (limits["cpu"], limits["memory"]) == ("1", "2Gi")


def _render_default(template: dict[str, Any]) -> dict[str, Any]:
    values = {"image": IMAGE, "cpu_request": "250m", "cpu_limit": "1", "memory_request": "512Mi"}
    return render_flow_run_job(template, {**values, "memory_limit": "2Gi"}, _flow_run()[0])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_unfixed_default_template_fails_strict_validation(version):
    default = KubernetesWorker.get_default_base_job_template()
    job = _render_default(default)
    with pytest.raises(kubernetes_validate.ValidationError) as err:
        kubernetes_validate.validate(job, version, strict=True)
    assert list(err.value.path) == ["spec", "template", "spec"]
    assert "'completions', 'parallelism' were unexpected" in err.value.message
    # ... and those two are all that is wrong with it
    pod = job["spec"]["template"]["spec"]
    del pod["completions"], pod["parallelism"]
    kubernetes_validate.validate(job, version, strict=True)


def test_worker_requires_parallelism_and_completions_so_they_are_moved_not_dropped():
    template = KubernetesWorker.get_default_base_job_template()
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    del pod["completions"], pod["parallelism"]
    with pytest.raises(ValidationError, match="missing required attributes"):
        _render_default(template)
    # moved to the Job spec (at 1, where the worker's check sees a move), the worker accepts them
    template["job_configuration"]["job_manifest"]["spec"].update(parallelism=1, completions=1)
    _validate(_render_default(template))


def _validate_job_variables(job_variables: dict[str, Any]) -> None:
    """What the Prefect server checks when a deployment is created on the pool."""
    from prefect.utilities.schema_tools.validation import validate

    schema = _template()["variables"]
    validate(job_variables, schema, raise_on_error=True, ignore_required=True, allow_none_with_default=True)


def test_gpu_count_must_be_a_string():
    _validate_job_variables({"gpu_count": "1"})
    from prefect.utilities.schema_tools.validation import ValidationError as JobVariablesError

    with pytest.raises(JobVariablesError, match="gpu_count"):
        _validate_job_variables({"gpu_count": 1})


# --- stage Jobs --------------------------------------------------------------------------------------

KEY = "3f9a1c2b7d" + "e" * 54  # a 64-character cache key: longer than a label value may be


def _spec(stage: str, gpus: int = 1, **kw: Any) -> StageSpec:
    argv = (stage, "--dataset", "s3://datasets/bottle/v3", "--out", f"s3://models/bottle/{stage}/{KEY}")
    return StageSpec(stage=stage, argv=argv, key=KEY, model_name="bottle", gpus=gpus, **kw)


STAGE_SPECS = [
    _spec("d", deadline_s=4 * 3600, backoff_limit=2, env={"TOCOAD_SEED": "7"}),
    _spec("c"),
    _spec("bank", memory="32Gi"),
    _spec("evaluate", gpus=0, cpu="2", memory="8Gi"),
]


@pytest.mark.parametrize("spec", STAGE_SPECS, ids=lambda s: s.stage)
def test_stage_job_passes_strict_validation(spec):
    job = render_stage_job(spec, JobSettings())
    _validate(job)
    assert job["metadata"]["name"] == spec.job_name and job["metadata"]["namespace"] == "tocoad"
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "tocoad"
    assert (labels["tocoad.io/stage"], labels["tocoad.io/model"]) == (spec.stage, "bottle")
    assert labels["tocoad.io/cache-key"] == KEY[:63]
    assert job["spec"]["activeDeadlineSeconds"] == spec.deadline_s
    assert job["spec"]["backoffLimit"] == spec.backoff_limit
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "tocoad-stage-job"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container(job)
    assert container["name"] == "stage" and container["image"] == IMAGE
    assert container["command"] == ["tocoad", *spec.argv]
    assert container["envFrom"] == [{"secretRef": {"name": "tocoad-s3-admin"}}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TOCOAD_PROGRESS"] == "0" and spec.env.items() <= env.items()
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["cpu"] == spec.cpu
        assert container["resources"][kind]["memory"] == spec.memory


@pytest.mark.parametrize("spec", [s for s in STAGE_SPECS if s.gpus], ids=lambda s: s.stage)
def test_gpu_stage_job_lands_on_a_gpu_node(spec):
    job = render_stage_job(spec, JobSettings())
    resources = _container(job)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["nvidia.com/gpu"] == "1"
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_cpu_stage_job_asks_for_no_gpu():
    job = render_stage_job(_spec("evaluate", gpus=0), JobSettings())
    resources = _container(job)["resources"]
    assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]
    pod = job["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_job_settings_from_environment(monkeypatch):
    for name, value in {
        "TOCOAD_K8S_NAMESPACE": "ml",
        "TOCOAD_JOB_IMAGE": "registry.local/tocoad:dev",
        "TOCOAD_JOB_S3_SECRET": "tocoad-s3-other",
        "TOCOAD_JOB_SERVICE_ACCOUNT": "runner",
    }.items():
        monkeypatch.setenv(name, value)
    settings = JobSettings.from_environment()
    assert (settings.namespace, settings.image) == ("ml", "registry.local/tocoad:dev")
    assert (settings.s3_secret, settings.service_account) == ("tocoad-s3-other", "runner")
    job = render_stage_job(_spec("d"), settings)
    _validate(job)
    assert _container(job)["envFrom"] == [{"secretRef": {"name": "tocoad-s3-other"}}]
    monkeypatch.delenv("TOCOAD_JOB_IMAGE")
    assert JobSettings.from_environment().image == IMAGE


# --- KubernetesRunner against a fake API --------------------------------------------------------------
# No cluster runs here, so BatchV1Api and CoreV1Api are replaced by FakeCluster, which returns the
# kubernetes client's own model objects and simulates the Job controller just enough.

UID_LABEL = "batch.kubernetes.io/controller-uid"


class FakeLog:
    """A followed log response (``_preload_content=False``): bytes in arbitrary chunks."""

    def __init__(self, lines: list[str]):
        self.data = "".join(f"{line}\n" for line in lines).encode()
        self.released = False

    def stream(self, amt=None, decode_content=None):
        for i in range(0, len(self.data), 7):
            yield self.data[i : i + 7]

    def release_conn(self):
        self.released = True


class FakeCluster:
    """One namespace of BatchV1Api and CoreV1Api. A created Job runs one pod per attempt; reading a pod's log
    to its end ends the pod with the attempt's exit code, and then the Job, as the Job controller would."""

    def __init__(self, attempts: list[tuple[int, list[str]]], pending_polls: int = 0):
        self.attempts = attempts  # per pod: (exit code, log lines)
        self.pending_polls = pending_polls  # list calls during which a new pod is still pulling its image
        self.jobs: dict[str, k8s.V1Job] = {}
        self.pods: list[k8s.V1Pod] = []
        self.logs: dict[str, list[str]] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.read_logs: list[str] = []
        self.errors: dict[str, Exception] = {}  # method name -> exception to raise
        self._clock = datetime(2025, 1, 1, tzinfo=UTC)

    def _maybe_fail(self, method: str) -> None:
        if method in self.errors:
            raise self.errors[method]

    def _now(self) -> datetime:
        self._clock += timedelta(seconds=1)
        return self._clock

    def add_job(self, name: str, outcome: str | None, uid: str = "old-uid", lines=("old attempt",)) -> None:
        """A Job that is already there: finished with ``outcome`` (Complete/Failed), or running (None)."""
        conditions = (
            [k8s.V1JobCondition(type=outcome, status="True", reason="BackoffLimitExceeded")]
            if outcome
            else None
        )
        status = k8s.V1JobStatus(conditions=conditions)
        self.jobs[name] = k8s.V1Job(metadata=k8s.V1ObjectMeta(name=name, uid=uid), status=status)
        self._add_pod(name, uid, "Failed" if outcome == "Failed" else "Running", list(lines))

    def _add_pod(self, job: str, uid: str, phase: str, lines: list[str]) -> None:
        name = f"{job}-{len(self.pods)}"
        waiting = k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason="ContainerCreating"))
        self.pods.append(
            k8s.V1Pod(
                metadata=k8s.V1ObjectMeta(
                    name=name, labels={UID_LABEL: uid, "job-name": job}, creation_timestamp=self._now()
                ),
                status=k8s.V1PodStatus(
                    phase=phase,
                    container_statuses=[
                        k8s.V1ContainerStatus(
                            name="stage",
                            image=IMAGE,
                            image_id="",
                            ready=False,
                            restart_count=0,
                            state=waiting,
                        )
                    ],
                ),
            )
        )
        self.logs[name] = lines

    # BatchV1Api
    def create_namespaced_job(self, namespace, body):
        self._maybe_fail("create_namespaced_job")
        assert namespace == "tocoad"
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise ApiException(status=409, reason="Conflict")
        self.created.append(body)
        uid = f"uid-{len(self.created)}"
        self.jobs[name] = k8s.V1Job(metadata=k8s.V1ObjectMeta(name=name, uid=uid), status=k8s.V1JobStatus())
        self._start_attempt(name, uid, 0)
        return self.jobs[name]

    def _start_attempt(self, job: str, uid: str, attempt: int) -> None:
        self._add_pod(job, uid, "Pending" if self.pending_polls else "Running", self.attempts[attempt][1])
        self.pods[-1].metadata.annotations = {"attempt": str(attempt)}

    def read_namespaced_job(self, name, namespace):
        self._maybe_fail("read_namespaced_job")
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        return self.jobs[name]

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        self.deleted.append(name)
        del self.jobs[name]  # pods stay a while (Background propagation)

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector):
        key, value = label_selector.split("=")
        pods = [p for p in self.pods if p.metadata.labels.get(key) == value]
        for pod in pods:
            if pod.status.phase == "Pending":
                if self.pending_polls:
                    self.pending_polls -= 1
                    pod.status.container_statuses[0].state.waiting.reason = "ImagePullBackOff"
                    pod.status.container_statuses[0].state.waiting.message = "Back-off pulling image"
                else:
                    pod.status.phase = "Running"
        return k8s.V1PodList(items=pods)

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content):
        assert container == "stage" and follow and _preload_content is False
        self.read_logs.append(name)
        (pod,) = [p for p in self.pods if p.metadata.name == name]
        if pod.metadata.annotations:  # a pod of a Job created here: its container ends with the log
            self._end(pod)
        return FakeLog(self.logs[name])

    def _end(self, pod: k8s.V1Pod) -> None:
        attempt = int(pod.metadata.annotations["attempt"])
        code = self.attempts[attempt][0]
        pod.status.phase = "Succeeded" if code == 0 else "Failed"
        terminated = k8s.V1ContainerStateTerminated(
            exit_code=code, reason="Completed" if code == 0 else "Error"
        )
        pod.status.container_statuses[0].state = k8s.V1ContainerState(terminated=terminated)
        job = self.jobs[pod.metadata.labels["job-name"]]
        if code == 0:
            job.status.conditions = [k8s.V1JobCondition(type="Complete", status="True")]
        elif attempt + 1 < len(self.attempts):
            self._start_attempt(job.metadata.name, job.metadata.uid, attempt + 1)
        else:
            job.status.conditions = [
                k8s.V1JobCondition(
                    type="Failed",
                    status="True",
                    reason="BackoffLimitExceeded",
                    message="Job has reached the specified backoff limit",
                )
            ]


def _runner(cluster: FakeCluster, **kw: Any) -> tuple[KubernetesRunner, list[float]]:
    slept: list[float] = []
    return KubernetesRunner(cluster, cluster, JobSettings(), poll_s=2.0, sleep=slept.append, **kw), slept


def test_runner_success_streams_logs():
    cluster = FakeCluster([(0, ["loading bottle", "epoch 1/2 loss 0.31", "epoch 2/2 loss 0.12", "saved"])], 2)
    runner, slept = _runner(cluster)
    lines: list[str] = []
    spec = _spec("d")
    runner.run(spec, lines.append)
    assert cluster.created == [render_stage_job(spec, JobSettings())]
    assert lines[0] == f"created job {spec.job_name} in namespace tocoad"
    assert f"pod {spec.job_name}-0 is waiting: ImagePullBackOff: Back-off pulling image" in lines
    assert lines[-4:] == ["loading bottle", "epoch 1/2 loss 0.31", "epoch 2/2 loss 0.12", "saved"]
    assert slept and set(slept) == {2.0}
    assert not cluster.deleted


def test_runner_failure_surfaces_reason_and_last_log_lines():
    log = [f"step {i}" for i in range(100)] + [
        "Traceback (most recent call last):",
        "RuntimeError: CUDA out of memory",
    ]
    cluster = FakeCluster([(1, ["first try"]), (1, log)])  # backoffLimit 1: two pods, both fail
    runner, _ = _runner(cluster)
    lines: list[str] = []
    spec = _spec("bank")
    with pytest.raises(StageFailed) as err:
        runner.run(spec, lines.append)
    assert "first try" in lines and lines[-1] == "RuntimeError: CUDA out of memory"  # both pods streamed
    message = str(err.value)
    assert f"stage bank ({spec.job_name}) failed: BackoffLimitExceeded" in message
    assert "Job has reached the specified backoff limit" in message
    assert "exit code 1" in message
    assert err.value.logs.splitlines() == log[-40:]
    assert err.value.transient is False


def test_runner_storage_exit_code_is_transient():
    cluster = FakeCluster([(3, ["cannot reach s3://models"])])
    runner, _ = _runner(cluster)
    with pytest.raises(StageFailed) as err:
        runner.run(_spec("c"), lambda line: None)
    assert err.value.transient is True and "exit code 3" in str(err.value)


def test_runner_replaces_an_existing_failed_job():
    spec = _spec("c")
    cluster = FakeCluster([(0, ["second time lucky"])])
    cluster.add_job(spec.job_name, "Failed")
    runner, _ = _runner(cluster)
    lines: list[str] = []
    runner.run(spec, lines.append)
    assert cluster.deleted == [spec.job_name]
    assert len(cluster.created) == 1 and cluster.jobs[spec.job_name].metadata.uid == "uid-1"
    assert "old attempt" not in lines and lines[-1] == "second time lucky"  # the old Job's pod is ignored
    assert cluster.read_logs == [f"{spec.job_name}-1"]


def test_runner_skips_a_succeeded_job_and_follows_a_running_one():
    spec = _spec("d")
    cluster = FakeCluster([(0, [])])
    cluster.add_job(spec.job_name, "Complete")
    lines: list[str] = []
    _runner(cluster)[0].run(spec, lines.append)
    assert not cluster.created and not cluster.deleted and not cluster.read_logs
    assert lines == [f"job {spec.job_name} already succeeded; not running it again"]

    cluster = FakeCluster([(0, [])])
    cluster.add_job(spec.job_name, None, uid="running-uid", lines=["half way"])
    pod = cluster.pods[-1]

    def finish(name, namespace, container, follow, _preload_content):  # the running pod ends with its log
        cluster.jobs[spec.job_name].status.conditions = [k8s.V1JobCondition(type="Complete", status="True")]
        pod.status.phase = "Succeeded"
        return FakeLog(["half way", "done"])

    cluster.read_namespaced_pod_log = finish
    lines = []
    _runner(cluster)[0].run(spec, lines.append)
    assert not cluster.created and not cluster.deleted
    assert lines[0] == f"job {spec.job_name} is already running; following it" and lines[-1] == "done"


def test_runner_follows_a_job_created_concurrently():
    spec = _spec("d")
    cluster = FakeCluster([(0, ["from the other run"])])
    create = cluster.create_namespaced_job

    def racing_create(namespace, body):  # another flow run creates it between our read and our create
        create(namespace, body)
        raise ApiException(status=409, reason="Conflict")

    cluster.create_namespaced_job = racing_create
    lines: list[str] = []
    _runner(cluster)[0].run(spec, lines.append)
    assert lines[-1] == "from the other run"


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ApiException(status=503, reason="Service Unavailable"), True),
        (ApiException(status=500, reason="Internal Server Error"), True),
        (ApiException(status=429, reason="Too Many Requests"), True),
        (urllib3.exceptions.MaxRetryError(None, "/apis/batch/v1", "connection refused"), True),
        (ConnectionResetError("reset by peer"), True),
        (ApiException(status=403, reason="Forbidden"), False),
        (ApiException(status=422, reason="Unprocessable Entity"), False),
    ],
)
def test_runner_api_errors(error, transient):
    cluster = FakeCluster([(0, [])])
    cluster.errors["create_namespaced_job"] = error
    with pytest.raises(StageFailed) as err:
        _runner(cluster)[0].run(_spec("d"), lambda line: None)
    assert err.value.transient is transient
    assert "stage d" in str(err.value)


def test_runner_gives_up_after_the_deadline():
    spec = _spec("d", deadline_s=60)
    cluster = FakeCluster([(0, [])], pending_polls=10**9)  # the pod never starts
    ticks = iter(range(0, 10**6, 100))
    runner, _ = _runner(cluster, clock=lambda: next(ticks))
    with pytest.raises(StageFailed, match="did not finish within 60 s") as err:
        runner.run(spec, lambda line: None)
    assert cluster.deleted == [spec.job_name] and err.value.transient is False


class FakeApiServer:
    """A few endpoints of the Kubernetes API over real HTTP, so that the real kubernetes client (its
    request serialization, response models and chunked log streaming) is exercised too. One Job, one pod:
    its log is served chunk by chunk, after which the pod has exited with ``exit_code``."""

    def __init__(self, log: list[str], exit_code: int = 0):
        self.log, self.exit_code = log, exit_code
        self.job: dict[str, Any] | None = None
        self.requests: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                fake.requests.append(f"POST {self.path}")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body["metadata"]["uid"] = "uid-1"
                body["status"] = {}
                fake.job = body
                self._send(201, body)

            def do_GET(self):
                fake.requests.append(f"GET {self.path}")
                url = urllib.parse.urlsplit(self.path)
                if url.path.startswith("/apis/batch/v1/namespaces/tocoad/jobs/"):
                    if fake.job is None:
                        return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    return self._send(200, fake.job)
                if url.path == "/api/v1/namespaces/tocoad/pods":
                    assert urllib.parse.parse_qs(url.query)["labelSelector"] == [f"{UID_LABEL}=uid-1"]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "items": [fake.pod()]})
                assert url.path == "/api/v1/namespaces/tocoad/pods/stage-pod/log"
                assert urllib.parse.parse_qs(url.query) == {"container": ["stage"], "follow": ["true"]}
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                data = "".join(f"{line}\n" for line in fake.log).encode()
                for i in range(0, len(data), 5):
                    chunk = data[i : i + 5]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
                fake.finish()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.finished = False

    def pod(self) -> dict[str, Any]:
        state = {"terminated": {"exitCode": self.exit_code}} if self.finished else {"running": {}}
        status = {
            "name": "stage",
            "image": IMAGE,
            "imageID": "",
            "ready": True,
            "restartCount": 0,
            "state": state,
        }
        meta = {
            "name": "stage-pod",
            "labels": {UID_LABEL: "uid-1"},
            "creationTimestamp": "2025-01-01T00:00:00Z",
        }
        phase = ("Succeeded" if self.exit_code == 0 else "Failed") if self.finished else "Running"
        return {"metadata": meta, "status": {"phase": phase, "containerStatuses": [status]}}

    def finish(self) -> None:
        self.finished = True
        ok = self.exit_code == 0
        condition = {"type": "Complete" if ok else "Failed", "status": "True"}
        if not ok:
            condition |= {
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        self.job["status"] = {"conditions": [condition]}

    def __enter__(self) -> KubernetesRunner:
        self.thread.start()
        config = k8s.Configuration(host=f"http://127.0.0.1:{self.server.server_address[1]}")
        api = k8s.ApiClient(config)
        return KubernetesRunner(k8s.BatchV1Api(api), k8s.CoreV1Api(api), JobSettings(), sleep=lambda s: None)

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("exit_code", [0, 1])
def test_runner_with_the_real_kubernetes_client(exit_code):
    spec = _spec("evaluate", gpus=0)
    fake = FakeApiServer(["évaluation", "image auroc 0.998", "done"], exit_code)
    lines: list[str] = []
    with fake as runner:
        if exit_code:
            with pytest.raises(StageFailed, match="failed: BackoffLimitExceeded") as err:
                runner.run(spec, lines.append)
            assert err.value.logs == "évaluation\nimage auroc 0.998\ndone"
        else:
            runner.run(spec, lines.append)
    assert lines[-3:] == ["évaluation", "image auroc 0.998", "done"]
    assert fake.job is not None
    sent = {k: v for k, v in fake.job.items() if k != "status"}
    sent["metadata"] = {k: v for k, v in sent["metadata"].items() if k != "uid"}
    assert sent == render_stage_job(spec, JobSettings())  # the client sent the rendered Job unchanged
    assert fake.requests[:2] == [
        f"GET /apis/batch/v1/namespaces/tocoad/jobs/{spec.job_name}",
        "POST /apis/batch/v1/namespaces/tocoad/jobs",
    ]


def test_make_runner_kubernetes_loads_the_kubeconfig(monkeypatch):
    from kubernetes import config

    def no_cluster():
        raise config.ConfigException("not in a cluster")

    loaded: list[bool] = []
    monkeypatch.setattr(config, "load_incluster_config", no_cluster)
    monkeypatch.setattr(config, "load_kube_config", lambda: loaded.append(True))
    monkeypatch.setenv("TOCOAD_K8S_NAMESPACE", "ml")
    runner = make_runner("kubernetes")
    assert isinstance(runner, KubernetesRunner) and loaded == [True]
    assert runner.settings.namespace == "ml"


# --- prefect.yaml -----------------------------------------------------------------------------------


def _deployments() -> dict[str, dict[str, Any]]:
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d for d in project["deployments"]}


def test_prefect_yaml_deployments():
    deployments = _deployments()
    assert set(deployments) == {"retrain-nightly", "retrain-on-new-data"}
    for deployment in deployments.values():
        assert deployment["entrypoint"] == "flows/retrain.py:retrain"
        assert deployment["work_pool"]["name"] == "tocoad-k8s"
        assert deployment["work_pool"]["job_variables"]["image"] == IMAGE
        assert deployment["parameters"]["runner"] == "kubernetes"
        _validate_job_variables(deployment["work_pool"]["job_variables"])
    assert deployments["retrain-nightly"]["parameters"] == {
        "dataset": "bottle",
        "model_name": "bottle",
        "runner": "kubernetes",
    }


def test_prefect_yaml_parses_as_prefect_deploy_reads_it():
    # prefect 3.9.1's own model of prefect.yaml and its schedule conversion (private modules, pinned version)
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.schedules import CronSchedule

    project = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    assert [d.name for d in project.deployments] == ["retrain-nightly", "retrain-on-new-data"]
    assert project.pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/tocoad"}}]
    (config,) = _deployments()["retrain-nightly"]["schedules"]
    converted = _schedule_config_to_deployment_schedule(config)
    assert converted["schedule"] == CronSchedule(cron="0 2 * * *", timezone="Europe/Berlin")
    assert converted["active"] is True


def test_prefect_yaml_nightly_schedule():
    from prefect.client.schemas.schedules import CronSchedule

    (config,) = _deployments()["retrain-nightly"]["schedules"]
    zoneinfo.ZoneInfo(config["timezone"])  # exists
    schedule = CronSchedule(cron=config["cron"], timezone=config["timezone"])
    assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    with pytest.raises(ValidationError):
        CronSchedule(cron="0 2 * *", timezone="Europe/Berlin")
    with pytest.raises(ValidationError):
        CronSchedule(cron="0 2 * * *", timezone="Europe/Atlantis")


def test_prefect_yaml_trigger_on_dataset_push():
    from prefect.events import DeploymentEventTrigger, DeploymentTriggerTypes
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.server.utilities.user_templates import render_user_template_sync
    from pydantic import TypeAdapter

    (spec,) = _deployments()["retrain-on-new-data"]["triggers"]
    # as `prefect deploy` does (prefect/cli/deploy/_triggers.py)
    trigger = TypeAdapter(DeploymentTriggerTypes).validate_python({**spec, "name": "retrain-on-new-data"})
    assert isinstance(trigger, DeploymentEventTrigger)
    assert trigger.expect == {"tocoad.dataset.pushed"} and trigger.enabled
    deployment_id = uuid.uuid4()
    trigger.set_deployment_id(deployment_id)
    automation = trigger.as_automation()
    (action,) = automation.actions
    assert action.deployment_id == deployment_id

    def event(resource_id: str, name: str = "tocoad.dataset.pushed") -> ReceivedEvent:
        resource = {
            "prefect.resource.id": resource_id,
            "prefect.resource.name": resource_id.rsplit(".", 1)[1],
        }
        return ReceivedEvent(occurred=datetime.now(UTC), event=name, resource=resource, id=uuid.uuid4())

    server_trigger = EventTrigger.model_validate(automation.trigger.model_dump(mode="json"))
    assert server_trigger.covers(event("tocoad.dataset.bottle"))
    assert not server_trigger.covers(event("tocoad.model.bottle"))
    assert not server_trigger.covers(event("tocoad.dataset.bottle", "tocoad.dataset.deleted"))
    pushed = event("tocoad.dataset.screw")
    rendered = {k: render_user_template_sync(v, {"event": pushed}) for k, v in action.parameters.items()}
    assert rendered == {"dataset": "screw", "model_name": "screw", "runner": "kubernetes"}


def test_template_copy_is_not_mutated_by_rendering():
    template = _template()
    before = copy.deepcopy(template)
    render_flow_run_job(template, {"gpu_count": "1"}, _flow_run()[0])
    assert template == before


@pytest.mark.parametrize(
    ("overrides", "gpus"),
    [
        ([], {"d": 0, "c": 0, "bank": 0}),  # the default: frozen F, nothing to train
        (["stage_d.enabled=true", "contrastive.enabled=true"], {"d": 1, "c": 1, "bank": 0}),
        (["contrastive.enabled=true", "contrastive.mode=adaptor"], {"d": 0, "c": 1, "bank": 0}),
        (
            ["stage_d.enabled=true", "stage_d.epochs=0", "contrastive.enabled=true"],
            {"d": 0, "c": 1, "bank": 0},
        ),
        (
            [
                "stage_d.enabled=true",
                "contrastive.enabled=true",
                "contrastive.mode=adaptor",
                "contrastive.adaptor_epochs=0",
            ],
            {"d": 1, "c": 0, "bank": 0},
        ),  # fmt: skip
    ],
)
def test_only_stages_that_train_get_a_gpu(overrides, gpus):
    from flows.stages import plan_training

    plan = plan_training("bottle", "bottle", "v1", "sha", overrides)
    assert {spec.stage: spec.gpus for spec in plan.stages} == gpus
