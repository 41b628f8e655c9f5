"""The end of the main job: start the predictor on the promoted model, send a few requests, show the metrics."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from serving.control import control_headers

SHOWN = ("tocoad_predictions_total", "tocoad_defect_rate", "tocoad_model_info", "tocoad_drift_window_images",
         "tocoad_request_errors_total")  # fmt: skip


def _port(preferred: int = 8080) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _call(url: str, body: dict | None = None, timeout: float = 60) -> str:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **control_headers()}
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode()


def serve_and_probe(model: str, data: Path, out: Path) -> str:
    """Start ``tocoad serve --model`` in the background (it keeps serving), score demo test images, print metrics.

    A predictor left on port 8080 by an earlier demo is reused: it is told to reload the production version.
    """
    try:
        _call("http://127.0.0.1:8080/v2/models/tocoad/ready", timeout=2)
        url = "http://127.0.0.1:8080"
        reloaded = json.loads(
            _call(f"{url}/v2/models/tocoad/reload", {"storage_uri": f"s3://models/{model}/production"})
        )
        print(f"\npredictor already running at {url}: reloaded {reloaded['version']}")
        return _probe(url, data, "already running")
    except (OSError, ValueError, KeyError):
        pass
    port = _port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / "predictor.log", "w")  # noqa: SIM115 - handed to the server process
    proc = subprocess.Popen([sys.executable, "-m", "tocoad.cli", "serve", "--model", model, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TOCOAD_SERVE_DRIFT_MIN_IMAGES": "4"})  # fmt: skip
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the predictor exited with {proc.returncode}; see {out / 'predictor.log'}")
        try:
            _call(f"{url}/v2/models/tocoad/ready", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the predictor did not get ready; see {out / 'predictor.log'}") from None
            time.sleep(0.5)
    print(f"\npredictor: {url} (pid {proc.pid}, serving {model} production; log {out / 'predictor.log'})")
    return _probe(url, data, f"kill {proc.pid}")


def _probe(url: str, data: Path, stop_hint: str) -> str:
    """Two good and two defective demo test images through V1; print the answers and the metrics."""
    paths = (
        sorted((data / "test" / "good").glob("*.png"))[:2]
        + sorted(p for p in (data / "test").rglob("*.png") if p.parent.name != "good")[:2]
    )
    body = {"instances": [{"image": {"b64": base64.b64encode(p.read_bytes()).decode()}} for p in paths]}
    predictions = json.loads(_call(f"{url}/v1/models/tocoad:predict", body))["predictions"]
    for path, pred in zip(paths, predictions, strict=True):
        print(f"  {path.parent.name}/{path.name}: {pred['label']:<9} score={pred['score']:.3f} "
              f"normalized={pred['normalized']:.3f} version={pred['model_version']}")  # fmt: skip
    metrics = _call(f"{url}/metrics")
    print("metrics:")
    for line in metrics.splitlines():
        if line.startswith(SHOWN):
            print(f"  {line}")
    if stop_hint.startswith("kill"):
        print(f"stop the predictor with: {stop_hint}   (and the S3 server with: tocoad storage down)")
    return url
