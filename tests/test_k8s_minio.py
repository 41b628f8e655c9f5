"""k8s/minio offline: strict schema validation, one policy source with storage/identities.py, generated Secrets."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_util import K8S, K8S_VERSIONS, kubernetes_validate

from storage.identities import BUCKETS, IDENTITIES, minio_policy
from storage.k8s_secrets import generate_credentials, main, render_yaml, secret_manifests

MINIO = K8S / "minio"


def _load(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path``."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _resources() -> list[str]:
    """The resource files listed in ``k8s/minio/kustomization.yaml``."""
    return _load(MINIO / "kustomization.yaml")[0]["resources"]


def _docs() -> list[dict[str, Any]]:
    """Every document of every resource file of ``k8s/minio``."""
    return [doc for name in _resources() for doc in _load(MINIO / name)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    """The only document of ``kind`` (and ``name``) in ``k8s/minio``."""
    found = [d for d in _docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pod_spec(kind: str) -> dict[str, Any]:
    return _one(kind)["spec"]["template"]["spec"]


def test_root_kustomization_lists_minio():
    root = _load(K8S / "kustomization.yaml")[0]
    assert root["kind"] == "Kustomization"
    assert "minio" in root["resources"]
    assert root["namespace"] == "tocoad"


def _root_docs() -> list[dict[str, Any]]:
    """Every document of every folder the root kustomization lists (k8s/minio, k8s/prefect, ...)."""
    return [
        doc
        for folder in _load(K8S / "kustomization.yaml")[0]["resources"]
        for name in _load(K8S / folder / "kustomization.yaml")[0]["resources"]
        for doc in _load(K8S / folder / name)
    ]


def test_kustomization_resources_exist_and_every_yaml_is_listed():
    listed = _resources()
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (MINIO / name).is_file(), name
    on_disk = {p.name for p in MINIO.iterdir() if p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert on_disk == set(listed)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pinned_versions_supported(version):
    assert version in kubernetes_validate.utils.all_versions()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_and_secrets_pass_strict_validation(version):
    docs = _docs() + secret_manifests()
    assert {d["kind"] for d in docs} >= {"Namespace", "Service", "StatefulSet", "ConfigMap", "Job", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_unknown_field():
    broken = copy.deepcopy(_one("StatefulSet"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "IfNotPresent"
    kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=False)  # only strict catches it
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)
    wrong_type = copy.deepcopy(_one("Job"))
    wrong_type["spec"]["backoffLimit"] = "six"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_build_is_valid():
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert len(docs) == len(_root_docs())
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tocoad", doc["metadata"]["name"]
        # custom resources have no schema in kubernetes-validate; their own tests check them:
        # InferenceService in tests/test_k8s_serving.py, PrometheusRule and PodMonitor in tests/test_monitoring.py
        if doc["apiVersion"].split("/")[0] in ("serving.kserve.io", "monitoring.coreos.com"):
            continue
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_policies_configmap_matches_identities():
    data = _one("ConfigMap", "tocoad-minio-policies")["data"]
    assert set(data) == {f"{name}.json" for name in IDENTITIES}
    for name, identity in IDENTITIES.items():
        assert data[f"{name}.json"] == json.dumps(minio_policy(identity), indent=2, sort_keys=True), name


def test_setup_job_references_secrets_buckets_and_policies():
    job = _one("Job", "tocoad-minio-setup")
    assert job["spec"]["backoffLimit"] == 6
    assert job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    (container,) = pod["containers"]
    assert container["image"].startswith("quay.io/minio/mc:RELEASE.")
    script = "\n".join(container.get("command", []) + container.get("args", []))
    env = {e["name"]: e for e in container["env"]}
    assert env["HOME"]["value"] == "/tmp"
    refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]): name
        for name, e in env.items()
        if "valueFrom" in e
    }
    assert (
        refs[("tocoad-minio-root", "MINIO_ROOT_USER")] and refs[("tocoad-minio-root", "MINIO_ROOT_PASSWORD")]
    )
    for name in IDENTITIES:
        access = refs[(f"tocoad-s3-{name}", "AWS_ACCESS_KEY_ID")]
        secret = refs[(f"tocoad-s3-{name}", "AWS_SECRET_ACCESS_KEY")]
        assert f'mc admin user add tocoad "${access}" "${secret}"' in script
        assert f'attach {name} "${access}"' in script
    assert len(set(refs.values())) == len(refs)  # distinct env names
    assert "mc admin policy attach tocoad" in script
    assert 'mc admin policy create tocoad "$name" "/policies/$name.json"' in script
    assert "for name in " + " ".join(IDENTITIES) + "; do" in script
    assert "for bucket in " + " ".join(BUCKETS) + "; do" in script
    assert "mc mb --ignore-existing" in script
    assert "mc alias set tocoad http://minio:9000" in script
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/policies"]]["configMap"]["name"] == "tocoad-minio-policies"
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("kind", ["StatefulSet", "Job"])
def test_pods_are_hardened(kind):
    pod = _pod_spec(kind)
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 1000 and ctx["fsGroup"] == 1000
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert ":" in container["image"] and not container["image"].endswith(":latest")
        assert container["resources"]["limits"] and container["resources"]["requests"]


def test_statefulset_storage_probes_and_credentials():
    sts = _one("StatefulSet", "minio")
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["server", "/data", "--console-address", ":9001"]
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[
        claim["metadata"]["name"]
    ] == "/data"
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/minio/health/ready",
        "port": 9000,
        "scheme": "HTTP",
    }
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/minio/health/live",
        "port": 9000,
        "scheme": "HTTP",
    }
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert container["envFrom"] == [{"secretRef": {"name": "tocoad-minio-root"}}]
    headless = _one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


def test_services_ports():
    svc = _one("Service", "minio")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"s3": 9000, "console": 9001}
    labels = _one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_generated_credentials_are_random_and_distinct():
    first, second = generate_credentials(), generate_credentials()
    assert set(first) == set(IDENTITIES)
    for access, secret in first.values():
        assert len(access) == 20 and access.isalnum() and access == access.upper()
        assert len(secret) == 40
        assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    values = [v for pair in first.values() for v in pair]
    assert len(values) == len(set(values))
    assert not set(values) & {v for pair in second.values() for v in pair}


def _by_name(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests}


def test_secret_manifests_contents():
    manifests = _by_name(secret_manifests(namespace="ns", endpoint="https://s3.example.com:9443"))
    assert set(manifests) == {"tocoad-minio-root"} | {f"tocoad-s3-{name}" for name in IDENTITIES}
    for m in manifests.values():
        assert m["type"] == "Opaque" and m["metadata"]["namespace"] == "ns"
    assert set(manifests["tocoad-minio-root"]["stringData"]) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    for name in IDENTITIES:
        data = manifests[f"tocoad-s3-{name}"]["stringData"]
        assert data["TOCOAD_S3_ENDPOINT"] == "https://s3.example.com:9443"
        assert data["TOCOAD_S3_REGION"] == "us-east-1"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(data)
    assert manifests["tocoad-s3-predictor"]["metadata"]["annotations"] == {
        "serving.kserve.io/s3-endpoint": "s3.example.com:9443",
        "serving.kserve.io/s3-usehttps": "1",
        "serving.kserve.io/s3-region": "us-east-1",
        "serving.kserve.io/s3-useanoncredential": "false",
    }
    assert "annotations" not in manifests["tocoad-s3-admin"]["metadata"]
    default = _by_name(secret_manifests())["tocoad-s3-predictor"]["metadata"]["annotations"]
    assert default["serving.kserve.io/s3-endpoint"] == "minio.tocoad.svc:9000"
    assert default["serving.kserve.io/s3-usehttps"] == "0"


def test_secret_manifests_are_random_and_use_given_credentials():
    first, second = _by_name(secret_manifests()), _by_name(secret_manifests())
    secret_keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")
    values = {
        name: {m["stringData"][k] for k in secret_keys if k in m["stringData"]} for name, m in first.items()
    }
    for name, own in values.items():
        assert len(own) == 2
        others = set().union(*(v for n, v in values.items() if n != name))
        assert not own & others, name
        assert not own & {second[name]["stringData"].get(k) for k in secret_keys}, name
    creds = {name: (f"AK{name.upper()}", f"sk-{name}") for name in IDENTITIES}
    given = _by_name(secret_manifests(credentials=creds, root=("root", "rootpass")))
    assert given["tocoad-minio-root"]["stringData"] == {
        "MINIO_ROOT_USER": "root",
        "MINIO_ROOT_PASSWORD": "rootpass",
    }
    for name, (access, secret) in creds.items():
        data = given[f"tocoad-s3-{name}"]["stringData"]
        assert (data["AWS_ACCESS_KEY_ID"], data["AWS_SECRET_ACCESS_KEY"]) == (access, secret)


def test_secret_manifests_reject_bad_input():
    with pytest.raises(ValueError, match="credentials"):
        secret_manifests(credentials={"admin": ("a", "b")})
    with pytest.raises(ValueError, match="endpoint"):
        secret_manifests(endpoint="minio:9000")


def test_render_yaml_and_cli(capsys):
    manifests = secret_manifests()
    assert list(yaml.safe_load_all(render_yaml(manifests))) == manifests
    assert main(["--namespace", "other"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert len(docs) == 1 + len(IDENTITIES)
    assert {d["metadata"]["namespace"] for d in docs} == {"other"}
    predictor = _by_name(docs)["tocoad-s3-predictor"]
    assert predictor["stringData"]["TOCOAD_S3_ENDPOINT"] == "http://minio.other.svc:9000"
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_no_credentials_checked_in():
    for path in K8S.rglob("*.yaml"):
        for doc in _load(path):
            assert doc.get("kind") != "Secret", path
