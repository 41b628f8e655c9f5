"""Rolling a new production version out: tell the local predictor to reload, or patch the InferenceService."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request


def deploy_version(model_name: str, storage_uri: str, cluster: bool) -> str:
    """Point the serving side at ``storage_uri``; return what was done, in words."""
    if cluster:
        return patch_inference_service(model_name, storage_uri)
    url = os.environ.get("TOCOAD_PREDICTOR_URL")
    if not url:
        return (
            "no local predictor to notify (set TOCOAD_PREDICTOR_URL); it picks production up when it starts"
        )
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v2/models/{model_name}/reload",
        data=json.dumps({"storage_uri": storage_uri}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return f"local predictor at {url} reloaded {storage_uri}: HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        raise RuntimeError(
            f"the predictor at {url} refused the reload: HTTP {exc.code} {exc.read()[:300]!r}"
        ) from None
    except OSError as exc:
        raise ConnectionError(f"cannot reach the predictor at {url}: {exc}") from None


def inference_service_patch(storage_uri: str) -> dict:
    """The merge patch that points an InferenceService's predictor at a new bundle."""
    return {"spec": {"predictor": {"model": {"storageUri": storage_uri}}}}


def patch_inference_service(model_name: str, storage_uri: str) -> str:
    """Patch ``InferenceService/<model_name>`` in ``$TOCOAD_K8S_NAMESPACE`` (default tocoad) to ``storage_uri``."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    namespace = os.environ.get("TOCOAD_K8S_NAMESPACE", "tocoad")
    client.CustomObjectsApi().patch_namespaced_custom_object(
        "serving.kserve.io",
        "v1beta1",
        namespace,
        "inferenceservices",
        model_name,
        inference_service_patch(storage_uri),
    )
    return f"InferenceService {namespace}/{model_name} now serves {storage_uri}"
