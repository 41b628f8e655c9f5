"""The end of the main job: start the predictor on the promoted model, send a few requests, show the metrics."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from serving.control import TOKEN_FILE_ENV, control_headers
from storage.settings import tocoad_home

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


def _token_file() -> Path:
    """The control token of the demo's predictor, made once beside the local S3 server's data (mode 600): a later
    demo reads it to tell the running predictor to reload."""
    path = tocoad_home() / "demo" / "control-token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path


def _call(url: str, body: dict | None = None, timeout: float = 60) -> str:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **control_headers(str(_token_file()))}
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode()


def serve_and_probe(model: str, data: Path, out: Path) -> str:
    """Start ``tocoad serve --model`` in the background (it keeps serving), score demo test images, print metrics.

    A predictor left on port 8080 by an earlier demo is reused: it is told to reload the production version,
    with the control token the demo gave it (:func:`_token_file`).
    """
    url = "http://127.0.0.1:8080"
    try:
        _call(f"{url}/v2/models/tocoad/ready", timeout=2)
    except OSError:
        pass  # nothing of ours answers there: start a predictor
    else:
        try:
            body = {"storage_uri": f"s3://models/{model}/production"}
            reloaded = json.loads(_call(f"{url}/v2/models/tocoad/reload", body))
        except (OSError, ValueError, KeyError) as exc:
            print(
                f"\na predictor at {url} refused to reload ({exc}): not an earlier demo's; starting another"
            )
        else:
            print(f"\npredictor already running at {url} (an earlier demo's): reloaded {reloaded['version']}")
            _probe(url, data)
            _stop_hint(_pid_file().read_text().strip() if _pid_file().is_file() else "<its pid>")
            return url
    port = _port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / "predictor.log", "w")  # noqa: SIM115 - handed to the server process
    proc = subprocess.Popen([sys.executable, "-m", "tocoad.cli", "serve", "--model", model, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TOCOAD_SERVE_DRIFT_MIN_IMAGES": "4",
                                 TOKEN_FILE_ENV: str(_token_file())})  # fmt: skip
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
    _probe(url, data)
    if port == 8080:  # the one a later demo reuses
        _pid_file().write_text(f"{proc.pid}\n")
    _stop_hint(str(proc.pid))
    return url


def _pid_file() -> Path:
    return _token_file().with_name("predictor.pid")


def _stop_hint(pid: str) -> None:
    print(f"the predictor and the S3 server keep running; stop them with:\n  kill {pid}\n"
          f"  {tocoad_command()} storage down")  # fmt: skip


def tocoad_command() -> str:
    """``tocoad`` as a user can run it from this shell without activating the venv: the script beside this
    Python (``.venv/bin/tocoad`` when below the working folder), else ``python -m tocoad.cli``."""
    script = Path(sys.executable).parent / "tocoad"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m tocoad.cli"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def _probe(url: str, data: Path) -> None:
    """Two good demo test images and the first of each defect type through V1; print the answers and metrics."""
    folders = sorted(d for d in (data / "test").iterdir() if d.is_dir() and d.name != "good")
    paths = sorted((data / "test" / "good").glob("*.png"))[:2] + [sorted(d.glob("*.png"))[0] for d in folders]
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
