"""Rolling a new production version out: tell the local predictor to reload, or patch the InferenceService."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from serving.control import control_headers


def deploy_version(model_name: str, storage_uri: str, cluster: bool) -> str:
    """Point the serving side at ``storage_uri``; return what was done, in words. A local predictor that follows a
    registry alias reloads that alias (it moves to the new production and keeps following it); one that is
    pinned, or serves a folder, is asked to load ``storage_uri``."""
    if cluster:
        return patch_inference_service(model_name, storage_uri)
    url = os.environ.get("TOCOAD_PREDICTOR_URL")
    if not url:
        return (
            "no local predictor to notify (set TOCOAD_PREDICTOR_URL); it picks production up when it starts"
        )
    base = f"{url.rstrip('/')}/v2/models/{os.environ.get('TOCOAD_PREDICTOR_MODEL', 'tocoad')}"
    following = _call(base, None).get("parameters", {}).get("following")
    body = {"version": following} if following else {"storage_uri": storage_uri}
    answer = _call(f"{base}/reload", body)
    what = f"its {following} alias" if following else storage_uri
    return f"local predictor at {url} reloaded {what}, serving {answer.get('version')}: HTTP 200"


def _call(url: str, body: dict | None) -> dict:
    """GET ``url`` (no body) or POST ``body`` to it with the control token; the JSON answer."""
    headers = {} if body is None else {"Content-Type": "application/json", **control_headers()}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers=headers, method="GET" if body is None else "POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"the predictor at {url} refused: HTTP {exc.code} {exc.read()[:300]!r}") from None
    except OSError as exc:
        raise ConnectionError(f"cannot reach the predictor at {url}: {exc}") from None


def inference_service_patch(storage_uri: str) -> list[dict]:
    """The JSON patch that points the custom predictor at a new bundle: the ``STORAGE_URI`` env of the container
    ``kserve-container`` (which KServe's storage initializer reads), guarded by tests of both names."""
    return [
        {"op": "test", "path": "/spec/predictor/containers/0/name", "value": "kserve-container"},
        {"op": "test", "path": "/spec/predictor/containers/0/env/0/name", "value": "STORAGE_URI"},
        {"op": "replace", "path": "/spec/predictor/containers/0/env/0/value", "value": storage_uri},
    ]


def patch_inference_service(model_name: str, storage_uri: str) -> str:
    """Patch ``InferenceService/$TOCOAD_ISVC_NAME`` (default tocoad) in ``$TOCOAD_K8S_NAMESPACE`` (default
    tocoad) to serve ``storage_uri`` (a version of ``model_name``)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    namespace = os.environ.get("TOCOAD_K8S_NAMESPACE", "tocoad")
    name = os.environ.get("TOCOAD_ISVC_NAME", "tocoad")
    client.CustomObjectsApi().patch_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", namespace, "inferenceservices", name,
        inference_service_patch(storage_uri), _content_type="application/json-patch+json",
    )  # fmt: skip
    return f"InferenceService {namespace}/{name} now serves {model_name}: {storage_uri}"
