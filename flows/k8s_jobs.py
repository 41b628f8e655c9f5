"""The ``kubernetes`` backend of :class:`flows.runner.StageRunner`: each stage is a GPU Job the flow creates itself.

How the pieces fit (see ``k8s/README.md``, section "Prefect"):

- The retraining flow runs as a flow run on the Prefect **Kubernetes work pool** ``tocoad-k8s``: the Prefect
  worker starts it in a small CPU pod from ``k8s/prefect/base-job-template.json``.
- The flow then creates each **stage Job directly with the kubernetes client** (this module), on a GPU node,
  watches it and streams its pod's log lines into the flow run. The local backend
  (:class:`flows.runner.LocalRunner`) runs the same ``tocoad <argv>`` command as a subprocess, so the flow
  has one runner interface, and per-stage deadlines and retries are the Job's own ``activeDeadlineSeconds``
  and ``backoffLimit``.

:meth:`KubernetesRunner.run` is idempotent, so a retried flow (or task) picks up where it left off: a Job of
the same name (the name carries the stage's cache key) that succeeded is not run again, one that is still
running is followed, and one that failed is deleted and created afresh.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from flows.runner import TRANSIENT_EXIT_CODES, StageFailed, StageSpec

CONTAINER = "stage"
USAGE_EXIT_CODE = 2  # the tocoad CLI's "bad arguments or configuration": retrying cannot help
LOCAL_GRACE_S = 600  # the Job's activeDeadlineSeconds ends it; this guards against a stuck Job controller


@dataclass
class JobSettings:
    """Cluster-side settings shared by every stage Job (the per-stage ones are in :class:`StageSpec`)."""

    namespace: str = "tocoad"
    image: str = "ghcr.io/tocoad/tocoad-train:0.1.0"
    s3_secret: str = "tocoad-s3-admin"
    service_account: str = "tocoad-stage-job"
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str]] = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    shm_size: str = "8Gi"
    ttl_after_finished_s: int = 86400
    image_pull_policy: str = "IfNotPresent"

    @classmethod
    def from_environment(cls) -> JobSettings:
        """Defaults, overridden by TOCOAD_K8S_NAMESPACE, TOCOAD_JOB_IMAGE, TOCOAD_JOB_S3_SECRET and
        TOCOAD_JOB_SERVICE_ACCOUNT (the flow pod's base job template sets the first two)."""
        env, default = os.environ, cls()
        return cls(
            namespace=env.get("TOCOAD_K8S_NAMESPACE") or default.namespace,
            image=env.get("TOCOAD_JOB_IMAGE") or default.image,
            s3_secret=env.get("TOCOAD_JOB_S3_SECRET") or default.s3_secret,
            service_account=env.get("TOCOAD_JOB_SERVICE_ACCOUNT") or default.service_account,
        )


def _label_value(value: str) -> str:
    """``value`` as a valid label value: allowed characters only, at most 63, alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")


def render_stage_job(spec: StageSpec, settings: JobSettings) -> dict[str, Any]:
    """The batch/v1 Job that runs ``tocoad <spec.argv>`` once, on a GPU node when ``spec.gpus > 0``."""
    labels = {
        "app.kubernetes.io/name": "tocoad",
        "app.kubernetes.io/component": "stage",
        "tocoad.io/stage": _label_value(spec.stage),
        "tocoad.io/model": _label_value(spec.model_name),
        "tocoad.io/cache-key": _label_value(spec.key),
    }
    quantities = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus > 0:
        quantities[settings.gpu_resource] = str(spec.gpus)  # a quantity is a string
    env = {**spec.env, "TOCOAD_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["tocoad", *spec.argv],
        "envFrom": [{"secretRef": {"name": settings.s3_secret}}],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            # PyTorch data loader workers share tensors through /dev/shm; the runtime's default is 64 MiB.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.gpus > 0:
        pod["nodeSelector"] = dict(settings.node_selector)
        pod["tolerations"] = [dict(t) for t in settings.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.job_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "activeDeadlineSeconds": spec.deadline_s,
            "backoffLimit": spec.backoff_limit,
            "ttlSecondsAfterFinished": settings.ttl_after_finished_s,
            "podFailurePolicy": {
                "rules": [
                    # a usage error fails the Job at once; a preempted or evicted pod is not counted
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": [USAGE_EXIT_CODE],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def _finished(job: Any) -> tuple[str, str, str] | None:
    """``(type, reason, message)`` of the Job's terminal condition (Complete or Failed), else None."""
    for cond in (job.status and job.status.conditions) or []:
        if cond.type in ("Complete", "Failed") and cond.status == "True":
            return cond.type, cond.reason or "", cond.message or ""
    return None


def _lines(chunks: Iterable[bytes]) -> Iterable[str]:
    """Decoded lines of a byte stream."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            yield line.decode("utf-8", "replace").rstrip("\r")
    if rest:
        yield rest.decode("utf-8", "replace").rstrip("\r")


def _terminated(pod: Any) -> Any:
    """The stage container's terminated state in ``pod``, if any."""
    for status in (pod.status and pod.status.container_statuses) or []:
        if status.name == CONTAINER and status.state and status.state.terminated:
            return status.state.terminated
    return None


def _api_error(what: str, exc: Exception) -> StageFailed:
    """A :class:`StageFailed` for a failed API call; 5xx, 429 and connection errors are transient."""
    if isinstance(exc, ApiException):
        status = exc.status or 0
        return StageFailed(
            f"{what}: Kubernetes API {status} {exc.reason}", transient=status >= 500 or status == 429
        )
    return StageFailed(f"{what}: cannot reach the Kubernetes API ({exc})", transient=True)


class KubernetesRunner:
    """Runs each stage as a Kubernetes Job and follows it to the end (see the module docstring)."""

    def __init__(
        self,
        batch: Any,
        core: Any,
        settings: JobSettings | None = None,
        poll_s: float = 5.0,
        tail_lines: int = 40,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.batch, self.core = batch, core  # kubernetes.client.BatchV1Api, CoreV1Api
        self.settings = settings or JobSettings()
        self.poll_s, self.tail_lines = poll_s, tail_lines
        self.sleep, self.clock = sleep, clock

    @classmethod
    def from_environment(cls) -> KubernetesRunner:
        """In-cluster credentials (the flow pod's ServiceAccount), else the local kubeconfig."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.BatchV1Api(), client.CoreV1Api(), JobSettings.from_environment())

    def run(self, spec: StageSpec, log: Callable[[str], None]) -> None:
        name = spec.job_name
        try:
            uid = self._start(spec, log)
            if uid is not None:
                self._follow(spec, uid, log)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _api_error(f"stage {spec.stage} ({name})", exc) from exc

    def _read(self, name: str) -> Any:
        """The Job ``name``, or None when there is none."""
        try:
            return self.batch.read_namespaced_job(name, self.settings.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _start(self, spec: StageSpec, log: Callable[[str], None]) -> str | None:
        """Create the Job (replacing a failed one of that name); its uid, or None if it already succeeded."""
        name, namespace = spec.job_name, self.settings.namespace
        job = self._read(name)
        done = _finished(job) if job is not None else None
        if done and done[0] == "Complete":
            log(f"job {name} already succeeded; not running it again")
            return None
        if done:
            log(f"job {name} failed before ({done[1]}); deleting it and starting afresh")
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
            for _ in range(60):  # the object goes at once without finalizers; wait until it has
                if self._read(name) is None:
                    break
                self.sleep(1.0)
            job = None
        if job is None:
            try:
                job = self.batch.create_namespaced_job(namespace, render_stage_job(spec, self.settings))
                log(f"created job {name} in namespace {namespace}")
            except ApiException as exc:
                if exc.status != 409:  # 409: created concurrently by another run; follow that one
                    raise
                job = self.batch.read_namespaced_job(name, namespace)
        else:
            log(f"job {name} is already running; following it")
        return job.metadata.uid

    def _follow(self, spec: StageSpec, uid: str, log: Callable[[str], None]) -> None:
        """Stream the newest pod's log until the Job is Complete or Failed; raise StageFailed on failure."""
        name, namespace = spec.job_name, self.settings.namespace
        tail: deque[str] = deque(maxlen=self.tail_lines)
        streamed: set[str] = set()
        waiting = ""
        give_up = self.clock() + spec.deadline_s + LOCAL_GRACE_S
        while True:
            job = self.batch.read_namespaced_job(name, namespace)
            pods = self.core.list_namespaced_pod(
                namespace, label_selector=f"batch.kubernetes.io/controller-uid={uid}"
            ).items
            pod = max(pods, key=lambda p: p.metadata.creation_timestamp, default=None)
            if pod is not None and pod.metadata.name not in streamed:
                if pod.status.phase in ("Running", "Succeeded", "Failed"):
                    streamed.add(pod.metadata.name)
                    log(f"--- pod {pod.metadata.name} ---")
                    self._stream(pod.metadata.name, tail, log)
                    continue  # the Job may have finished meanwhile, or started another pod
                why = self._waiting_reason(pod)
                if why and why != waiting:
                    waiting = why
                    log(f"pod {pod.metadata.name} is waiting: {why}")
            done = _finished(job)
            if done and done[0] == "Complete":
                return
            if done:
                self._fail(spec, f"failed: {done[1]}: {done[2]}".rstrip(": "), pods, tail)
            if self.clock() > give_up:
                self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
                self._fail(spec, f"did not finish within {spec.deadline_s} s; deleted it", pods, tail)
            self.sleep(self.poll_s)

    def _stream(self, pod: str, tail: deque[str], log: Callable[[str], None]) -> None:
        """Follow ``pod``'s log line by line until its container ends."""
        try:
            resp = self.core.read_namespaced_pod_log(
                pod, self.settings.namespace, container=CONTAINER, follow=True, _preload_content=False
            )
        except ApiException as exc:
            if exc.status not in (400, 404):  # 400: the container never started; 404: the pod is gone
                raise
            log(f"no log from pod {pod}: {exc.reason}")
            return
        try:
            # as kubernetes.watch does: a followed log is chunked, and each chunk comes as it arrives
            for line in _lines(resp.stream(amt=None, decode_content=False)):
                tail.append(line)
                log(line)
        finally:
            resp.release_conn()

    @staticmethod
    def _waiting_reason(pod: Any) -> str:
        """Why ``pod``'s container is not running yet (e.g. ImagePullBackOff), or ''."""
        for status in (pod.status and pod.status.container_statuses) or []:
            if status.state and status.state.waiting and status.state.waiting.reason:
                return f"{status.state.waiting.reason}: {status.state.waiting.message or ''}".rstrip(": ")
        return ""

    def _fail(self, spec: StageSpec, why: str, pods: list[Any], tail: deque[str]) -> None:
        """Raise StageFailed with the newest pod's exit status and the last log lines."""
        newest = max(pods, key=lambda p: p.metadata.creation_timestamp, default=None)
        state = _terminated(newest) if newest is not None else None
        detail = f" (container {state.reason or 'exited'}, exit code {state.exit_code})" if state else ""
        transient = state is not None and state.exit_code in TRANSIENT_EXIT_CODES
        raise StageFailed(f"stage {spec.stage} ({spec.job_name}) {why}{detail}", "\n".join(tail), transient)
