"""k8s/serving offline: strict validation of the ServiceAccount and of the KServe InferenceService (CPU and GPU).

The InferenceService is a custom resource, which kubernetes-validate does not know. No registry this project
reaches ships KServe's CRD (the kserve wheel and sdist carry no CRD; npm has no KServe models package), so
it is validated against ``k8s/schemas/inferenceservice-serving-v1beta1.json``: a strict JSON Schema generated
here from the kserve SDK's models (themselves generated from KServe's OpenAPI spec), whose Kubernetes types
(``V1Container``, ``V1Volume``, ...) point into kubernetes-validate's strict definitions of each pinned
Kubernetes version. Unknown fields are rejected at every level. See ``k8s/schemas/README.md``.

Regenerate the schema after a kserve upgrade::

    TOCOAD_WRITE_ISVC_SCHEMA=1 .venv/bin/python -m pytest -q tests/test_k8s_serving.py -k vendored
"""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import pytest
import yaml
from k8s_util import K8S, K8S_VERSIONS, REPO, kubernetes_validate
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from storage.k8s_secrets import SECRET_PREFIX, secret_manifests

SERVING = K8S / "serving"
GPU = SERVING / "gpu"
ISVC_SCHEMA = K8S / "schemas" / "inferenceservice-serving-v1beta1.json"
PREDICTOR_SECRET = f"{SECRET_PREFIX}predictor"
STORAGE_URI_ENV = "STORAGE_URI"  # KServe's CustomSpecStorageUriEnvVarKey


def _load(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path``."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _docs() -> list[dict[str, Any]]:
    """Every document of every resource file of ``k8s/serving``."""
    return [
        doc for name in _load(SERVING / "kustomization.yaml")[0]["resources"] for doc in _load(SERVING / name)
    ]


def _one(kind: str) -> dict[str, Any]:
    (found,) = [d for d in _docs() if d["kind"] == kind]
    return found


def _isvc() -> dict[str, Any]:
    return _one("InferenceService")


def _container(isvc: dict[str, Any]) -> dict[str, Any]:
    (container,) = isvc["spec"]["predictor"]["containers"]
    return container


# --- the InferenceService schema, from the kserve SDK --------------------------------------------------------

K8S_DEFS = "https://kubernetes.io/api/_definitions.json"  # the $id of kubernetes-validate's _definitions.json
SCHEMA_ID = "https://schemas.tocoad.example/k8s/inferenceservice-serving-v1beta1.json"
_PRIMITIVES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
    "datetime": {"type": "string"},
}
# SDK type names that are not the Kubernetes definition's own name.
_K8S_ALIASES = {
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "V1beta1MetricQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",  # Go: resource.Quantity
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1Time": "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
}
_REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")


def _k8s_ref(name: str) -> dict[str, str]:
    return {"$ref": f"{K8S_DEFS}#/$defs/{name}"}


def generate_isvc_schema() -> dict[str, Any]:
    """A strict JSON Schema of ``serving.kserve.io/v1beta1`` InferenceService from the installed kserve SDK.

    Every KServe object gets its ``attribute_map`` as ``properties``, its non-None-checked fields as
    ``required`` and ``additionalProperties: false``; Kubernetes types are ``$ref``s into kubernetes-validate's
    (strict) ``_definitions.json``. ``status`` is left open: the controller writes it, never a manifest.
    """
    import kserve.models as models

    k8s_names = set(_k8s_definitions(K8S_VERSIONS[-1])["$defs"])
    defs: dict[str, Any] = {}
    queue = ["V1beta1InferenceServiceSpec"]

    def type_schema(sdk_type: str) -> dict[str, Any]:
        sdk_type = sdk_type.strip()
        if m := re.fullmatch(r"list\[(.+)\]", sdk_type):
            return {"type": "array", "items": type_schema(m[1])}
        if m := re.fullmatch(r"dict\(str, ?(.+)\)", sdk_type):
            return {"type": "object", "additionalProperties": type_schema(m[1])}
        if sdk_type in _PRIMITIVES:
            return dict(_PRIMITIVES[sdk_type])
        if sdk_type in _K8S_ALIASES:
            name = _K8S_ALIASES[sdk_type]
        elif re.fullmatch(r"V1(alpha|beta)\d+\w+", sdk_type) and hasattr(models, sdk_type):
            queue.append(sdk_type)
            return {"$ref": f"#/$defs/{sdk_type}"}
        elif m := re.fullmatch(r"V1([A-Z]\w*)", sdk_type):
            name = f"io.k8s.api.core.v1.{m[1]}"
        elif m := re.fullmatch(r"K8sIoApi([A-Z][a-z0-9]*)(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)", sdk_type):
            name = f"io.k8s.api.{m[1].lower()}.{m[2].lower()}.{m[3]}"
        else:
            raise ValueError(f"kserve SDK type {sdk_type!r} has no mapping to a schema")
        if name not in k8s_names:
            raise ValueError(f"kserve SDK type {sdk_type!r} -> {name}, unknown to kubernetes-validate")
        return _k8s_ref(name)

    while queue:
        name = queue.pop()
        if name in defs:
            continue
        cls = getattr(models, name)
        defs[name] = {}  # placeholder against cycles
        required = sorted(cls.attribute_map[attr] for attr in _REQUIRED.findall(inspect.getsource(cls)))
        properties = {
            cls.attribute_map[attr]: type_schema(t) for attr, t in sorted(cls.openapi_types.items())
        }
        defs[name] = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            defs[name]["required"] = required
    version = importlib.metadata.version("kserve")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"serving.kserve.io/v1beta1 InferenceService, generated from the kserve {version} SDK models",
        "x-generated-from": {"package": "kserve", "version": version, "license": "Apache-2.0"},
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string", "enum": ["serving.kserve.io/v1beta1"]},
            "kind": {"type": "string", "enum": ["InferenceService"]},
            "metadata": _k8s_ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
            "spec": {"$ref": "#/$defs/V1beta1InferenceServiceSpec"},
            "status": {"type": "object"},
        },
        "additionalProperties": False,
        "$defs": dict(sorted(defs.items())),
    }


def _render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


@cache
def _k8s_definitions(version: str) -> dict[str, Any]:
    """kubernetes-validate's strict ``_definitions.json`` for Kubernetes ``version``."""
    return schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)


@cache
def _isvc_schema() -> dict[str, Any]:
    return json.loads(ISVC_SCHEMA.read_text())


def validate_isvc(doc: dict[str, Any], version: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``doc`` is a valid InferenceService (strict)."""
    schema = _isvc_schema()
    registry = Registry().with_resources(
        [
            (SCHEMA_ID, Resource.from_contents(schema)),
            (K8S_DEFS, Resource.from_contents(_k8s_definitions(version))),
        ]
    )
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


def _pod_of(isvc: dict[str, Any]) -> dict[str, Any]:
    """The predictor's PodSpec fields as a core v1 Pod (KServe inlines PodSpec into the predictor)."""
    pod_fields = set(_k8s_definitions(K8S_VERSIONS[0])["$defs"]["io.k8s.api.core.v1.PodSpec"]["properties"])
    spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k in pod_fields}
    metadata = {"name": f"{isvc['metadata']['name']}-predictor", "namespace": isvc["metadata"]["namespace"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def test_vendored_schema_matches_kserve_sdk():
    pytest.importorskip("kserve")
    if os.environ.get("TOCOAD_WRITE_ISVC_SCHEMA"):
        ISVC_SCHEMA.write_text(_render(generate_isvc_schema()))
        _isvc_schema.cache_clear()
    installed = importlib.metadata.version("kserve")
    recorded = _isvc_schema()["x-generated-from"]["version"]
    if installed != recorded:
        pytest.skip(
            f"kserve {installed} installed, the schema is from {recorded}: see this module's docstring"
        )
    assert ISVC_SCHEMA.read_text() == _render(generate_isvc_schema())
    assert f"kserve {recorded}" in (K8S / "schemas" / "README.md").read_text()


def test_schema_is_strict_everywhere():
    schema = _isvc_schema()
    assert len(schema["$defs"]) > 30 and ISVC_SCHEMA.stat().st_size < 500_000
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        assert definition["type"] == "object" and definition["additionalProperties"] is False, name
    predictor = schema["$defs"]["V1beta1PredictorSpec"]["properties"]
    assert {"containers", "minReplicas", "maxReplicas", "serviceAccountName", "model", "volumes"} <= set(
        predictor
    )
    assert predictor["containers"]["items"] == _k8s_ref("io.k8s.api.core.v1.Container")
    assert schema["$defs"]["V1beta1InferenceServiceSpec"]["required"] == ["predictor"]
    # the referenced Kubernetes definitions are kubernetes-validate's strict ones
    for version in K8S_VERSIONS:
        assert (
            _k8s_definitions(version)["$defs"]["io.k8s.api.core.v1.Container"]["additionalProperties"]
            is False
        )


# --- kustomize ------------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_root_lists_serving():
    listed = _load(SERVING / "kustomization.yaml")[0]["resources"]
    on_disk = {p.name for p in SERVING.iterdir() if p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk and len(listed) == len(on_disk)
    root = _load(K8S / "kustomization.yaml")[0]
    assert {"minio", "prefect", "serving"} <= set(root["resources"])
    assert "serving/gpu" not in root["resources"]  # a component, not a resource
    component = _load(GPU / "kustomization.yaml")[0]
    assert component["kind"] == "Component"
    assert [p["path"] for p in component["patches"]] == ["gpu-patch.json"]


def _gpu_isvc_by_patch() -> dict[str, Any]:
    """The GPU variant: the component's JSON patch applied to the InferenceService."""
    (target,) = [p["target"] for p in _load(GPU / "kustomization.yaml")[0]["patches"]]
    isvc = _isvc()
    assert (target["group"] + "/" + target["version"], target["kind"], target["name"]) == (
        isvc["apiVersion"],
        isvc["kind"],
        isvc["metadata"]["name"],
    )
    ops = json.loads((GPU / "gpu-patch.json").read_text())
    return jsonpatch.apply_patch(isvc, ops)


def _kustomize(tmp_path: Path, with_gpu: bool) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of k8s/serving (plus the GPU component) from an overlay in ``tmp_path``."""
    up = os.path.relpath(SERVING, tmp_path)  # kustomize takes no absolute paths
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "tocoad",
        "resources": [up],
    }
    if with_gpu:
        overlay["components"] = [f"{up}/gpu"]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    out = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _variants() -> dict[str, dict[str, Any]]:
    return {"cpu": _isvc(), "gpu": _gpu_isvc_by_patch()}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("with_gpu", [False, True])
def test_kustomize_builds_what_the_tests_validate(tmp_path, with_gpu):
    docs = _kustomize(tmp_path, with_gpu)
    assert sorted(d["kind"] for d in docs) == ["InferenceService", "ServiceAccount"]
    for doc in docs:
        assert doc["metadata"]["namespace"] == "tocoad"
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    assert isvc == _variants()["gpu" if with_gpu else "cpu"]


# --- strict validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_pass_strict_validation(version):
    core = [d for d in _docs() if d["kind"] != "InferenceService"]
    assert {d["kind"] for d in core} == {"ServiceAccount"}
    for doc in core:
        assert doc["metadata"]["namespace"] == "tocoad"
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_inference_service_passes_strict_validation(version, variant):
    isvc = _variants()[variant]
    assert isvc["metadata"]["namespace"] == "tocoad"
    validate_isvc(isvc, version)
    # and the predictor's pod part, container included, as a core Pod
    kubernetes_validate.validate(_pod_of(isvc), version, strict=True)


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("predictor", "minReplica"),  # a typo of minReplicas
        ("spec", "predicter"),
        ("container", "imagePullPolicyy"),
        ("probe", "httpGett"),
        ("top", "specs"),
    ],
)
def test_strict_validation_rejects_unknown_fields(where, field):
    broken = copy.deepcopy(_isvc())
    container = _container(broken)
    target = {
        "predictor": broken["spec"]["predictor"],
        "spec": broken["spec"],
        "container": container,
        "probe": container["readinessProbe"],
        "top": broken,
    }[where]
    target[field] = 1
    for version in K8S_VERSIONS:
        with pytest.raises(jsonschema.ValidationError, match=field):
            validate_isvc(broken, version)


def test_strict_validation_rejects_wrong_types_and_missing_predictor():
    wrong = copy.deepcopy(_isvc())
    wrong["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="one"):
        validate_isvc(wrong, K8S_VERSIONS[0])
    bad_quantity = copy.deepcopy(_isvc())
    _container(bad_quantity)["resources"]["limits"]["memory"] = {"Gi": 8}
    with pytest.raises(jsonschema.ValidationError):
        validate_isvc(bad_quantity, K8S_VERSIONS[0])
    no_predictor = copy.deepcopy(_isvc())
    del no_predictor["spec"]["predictor"]
    with pytest.raises(jsonschema.ValidationError, match="predictor"):
        validate_isvc(no_predictor, K8S_VERSIONS[0])
    wrong_kind = dict(copy.deepcopy(_isvc()), apiVersion="serving.kserve.io/v1alpha1")
    with pytest.raises(jsonschema.ValidationError):
        validate_isvc(wrong_kind, K8S_VERSIONS[0])


def test_broken_predictor_is_rejected_by_the_pod_check_too():
    broken = copy.deepcopy(_isvc())
    _container(broken)["imagePullPolicyy"] = "IfNotPresent"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(_pod_of(broken), K8S_VERSIONS[0], strict=True)


# --- what the manifests say ----------------------------------------------------------------------------------


def test_inference_service_metadata_and_scaling():
    isvc = _isvc()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["name"] == "tocoad"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"  # a string: annotation values are strings
    assert annotations["prometheus.io/path"] == "/metrics"
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 3)
    assert predictor["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"] == "tocoad-predictor"
    assert predictor["automountServiceAccountToken"] is False
    assert "model" not in predictor  # a custom predictor: the model comes from the container's STORAGE_URI


def test_container_runs_the_predictor_contract():
    container = _container(_isvc())
    assert container["name"] == "kserve-container"  # KServe's InferenceServiceContainerName
    image, _, tag = container["image"].rpartition(":")
    assert image == "ghcr.io/tocoad/tocoad-serve" and tag == "0.1.0"
    assert container["command"] + container["args"] == [
        "tocoad",
        "serve",
        "--storage-uri",
        "$(STORAGE_URI)",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--model-name",
        "tocoad",
    ]
    assert container["ports"] == [{"containerPort": 8080, "name": "http1", "protocol": "TCP"}]


def test_container_storage_uri_and_credentials():
    container = _container(_isvc())
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[STORAGE_URI_ENV].startswith("s3://models/bottle/")
    assert env["TOCOAD_S3_ROLE"] == "predictor"
    assert env["TOCOAD_HOME"] == "/cache"
    assert container["envFrom"] == [{"secretRef": {"name": PREDICTOR_SECRET}}]
    # the Secret that storage/k8s_secrets.py makes for that name has what the container and KServe read
    (secret,) = [s for s in secret_manifests() if s["metadata"]["name"] == PREDICTOR_SECRET]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TOCOAD_S3_ENDPOINT", "TOCOAD_S3_REGION"} <= set(
        secret["stringData"]
    )
    assert "serving.kserve.io/s3-endpoint" in secret["metadata"]["annotations"]


def test_storage_uri_is_where_the_flow_patches():
    """The rollout's JSON patch: test container 0 and env 0 by name, then replace env 0's value."""
    isvc = _isvc()
    uri = "s3://models/bottle/20260101T000000.000Z-0123abcd"
    patch = [
        {"op": "test", "path": "/spec/predictor/containers/0/name", "value": "kserve-container"},
        {"op": "test", "path": "/spec/predictor/containers/0/env/0/name", "value": STORAGE_URI_ENV},
        {"op": "replace", "path": "/spec/predictor/containers/0/env/0/value", "value": uri},
    ]
    for variant in _variants().values():
        patched = jsonpatch.apply_patch(variant, patch)
        assert _container(patched)["env"][0] == {"name": STORAGE_URI_ENV, "value": uri}
        validate_isvc(patched, K8S_VERSIONS[-1])
    moved = copy.deepcopy(isvc)
    _container(moved)["env"].reverse()
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(moved, patch)


def test_probes_on_the_v2_health_endpoints():
    container = _container(_isvc())
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/v2/health/ready",
        "port": 8080,
        "scheme": "HTTP",
    }
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/v2/health/live",
        "port": 8080,
        "scheme": "HTTP",
    }
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a slow model load is no restart


def test_resources_and_hardening():
    isvc = _isvc()
    container = _container(isvc)
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    pod = isvc["spec"]["predictor"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000 and pod["fsGroup"] == 1000
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in isvc["spec"]["predictor"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == {"/tmp", "/cache"}
    for path in mounts:
        assert "emptyDir" in volumes[mounts[path]], path


def test_gpu_variant():
    cpu, gpu = _variants()["cpu"], _variants()["gpu"]
    container = _container(gpu)
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert container["image"] == "ghcr.io/tocoad/tocoad-serve:0.1.0-cu126"
    predictor = gpu["spec"]["predictor"]
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert predictor["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # everything else is the CPU InferenceService
    for isvc in (cpu, gpu):
        predictor = isvc["spec"]["predictor"]
        for key in ("nodeSelector", "tolerations"):
            predictor.pop(key, None)
        _container(isvc).pop("image")
        _container(isvc)["resources"]["limits"].pop("nvidia.com/gpu", None)
    assert cpu == gpu
    assert "nvidia.com/gpu" not in _container(_isvc())["resources"]["limits"]


def test_service_account_lists_the_predictor_secret():
    sa = _one("ServiceAccount")
    assert sa["metadata"]["name"] == "tocoad-predictor"
    assert sa["secrets"] == [{"name": PREDICTOR_SECRET}]
    assert sa["automountServiceAccountToken"] is False


def test_serving_dockerfile():
    text = (REPO / "docker" / "Dockerfile.serve").read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, flags=re.M)
    assert base.startswith("python:3.11.") and base.endswith("-slim-bookworm")
    pyproject = (REPO / "pyproject.toml").read_text()
    (torch_pin,) = re.findall(r'"torch==([\d.]+)"', pyproject)
    assert f"ARG TORCH_VERSION={torch_pin}" in text
    assert "ARG TORCH_INDEX=cpu" in text and "download.pytorch.org/whl/${TORCH_INDEX}" in text
    assert "USER 1000:1000" in text
    assert 'ENTRYPOINT ["tocoad", "serve"]' in text
    assert "EXPOSE 8080" in text
