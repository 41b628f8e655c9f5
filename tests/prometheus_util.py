"""A real Prometheus server for tests: scrape given targets, load rule files, run PromQL over its HTTP API.

    from prometheus_util import start_prometheus
    prom = start_prometheus(tmp_path, ["127.0.0.1:8080"], rule_files=[RULES])
    try:
        prom.wait_for('tocoad_model_info', timeout=20)
        series = prom.query('sum by (model) (rate(tocoad_predictions_total[1m]))')
    finally:
        prom.stop()

or the fixture :func:`prometheus_factory` (expose it in a test module with
``prometheus_factory = prometheus_util.prometheus_factory``), which stops every server it started.

The binary is ``$PROMETHEUS_BIN``, else ``prometheus`` on PATH, else ``/usr/bin/prometheus`` (Debian's
``prometheus`` package); :func:`require_binary` skips a test when it is missing, or fails it under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

STARTUP_TIMEOUT = 30.0


class PrometheusError(RuntimeError):
    """The Prometheus HTTP API answered with an error (e.g. a PromQL syntax error)."""

    def __init__(self, expr: str, error_type: str, error: str):
        super().__init__(f"{error_type}: {error} (query: {expr})")
        self.expr, self.error_type, self.error = expr, error_type, error


def require_binary(name: str, env: str | None = None) -> str:
    """The path of the executable ``name`` (``$env`` first, then PATH, then /usr/bin).

    Skips the calling test when it is missing, or fails it under CI=true (like ``_require`` in conftest.py).
    """
    candidates = [os.environ.get(env, "")] if env else []
    candidates += [shutil.which(name) or "", f"/usr/bin/{name}"]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    reason = f"{name} not found (install the Debian package `prometheus`, or set {env or 'PATH'})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def prometheus_binary() -> str:
    """The Prometheus server binary, or skip (fail under CI=true)."""
    return require_binary("prometheus", "PROMETHEUS_BIN")


def promtool_binary() -> str:
    """The promtool binary, or skip (fail under CI=true)."""
    return require_binary("promtool", "PROMTOOL_BIN")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusProcess:
    """A running ``prometheus`` with its own config and TSDB under a directory; see :func:`start_prometheus`."""

    def __init__(self, proc: subprocess.Popen, url: str, workdir: Path, log_path: Path):
        self.proc, self.url, self.workdir, self.log_path = proc, url, workdir, log_path

    # --- HTTP API ---------------------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, str] | list[tuple[str, str]] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=30) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:  # 400/422/503 carry a JSON error body
            try:
                body = json.load(err)
            except ValueError:
                raise PrometheusError(path, f"http {err.code}", str(err.reason)) from err
        if body.get("status") != "success":
            expr = dict(params or {}).get("query", path)
            raise PrometheusError(expr, body.get("errorType", "?"), body.get("error", "?"))
        return body["data"]

    def query(self, expr: str, time_s: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the result list (``[{"metric": {...}, "value": [t, "v"]}, ...]``).

        Raises :class:`PrometheusError` when Prometheus rejects the query (syntax error, bad matching, ...).
        A scalar or string result is returned as a one-element list.
        """
        params = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout: float = 20.0, interval: float = 0.25) -> list[dict[str, Any]]:
        """Poll ``query(expr)`` until it returns at least one series; raise TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no series for {expr!r} after {timeout:.0f}s; targets: {self.targets()}")
            self._check_alive()
            time.sleep(interval)

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """``/api/v1/label/<label>/values`` (Grafana's ``label_values(match, label)``)."""
        return self._get(f"/api/v1/label/{label}/values", [("match[]", match)] if match else None)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets: scrapeUrl, health and lastError of each."""
        data = self._get("/api/v1/targets", {"state": "active"})
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in data["activeTargets"]]

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups (``/api/v1/rules``)."""
        return self._get("/api/v1/rules")["groups"]

    # --- process --------------------------------------------------------------------------------------------
    def log(self) -> str:
        """Prometheus's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> PrometheusProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(
    path: Path,
    targets: Sequence[str],
    scrape_interval: str = "1s",
    rule_files: Sequence[str | Path] | None = None,
    evaluation_interval: str | None = None,
) -> Path:
    """A prometheus.yml: one job ``tocoad`` scraping ``targets`` at /metrics, and ``rule_files``."""
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval or scrape_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files or ()],
        "scrape_configs": [
            {"job_name": "tocoad", "metrics_path": "/metrics", "static_configs": [{"targets": list(targets)}]}
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(
    tmp_dir: str | Path,
    targets: Sequence[str],
    scrape_interval: str = "1s",
    rule_files: Sequence[str | Path] | None = None,
    evaluation_interval: str | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> PrometheusProcess:
    """Start Prometheus on a free 127.0.0.1 port, scraping ``targets`` (``host:port``) at /metrics.

    Rules are evaluated every ``evaluation_interval`` (default: the scrape interval). Returns once
    ``/-/ready`` answers; raises RuntimeError (with the log) if it exits or is not ready within ``timeout`` s.
    """
    binary = prometheus_binary()
    workdir = Path(tmp_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "prometheus.yml", targets, scrape_interval, rule_files, evaluation_interval
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    prom = PrometheusProcess(proc, url, workdir, log_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            prom._check_alive()
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return prom
        except OSError:  # not listening yet, or 503 while starting (HTTPError)
            pass
        if time.monotonic() > deadline:
            prom.stop()
            raise RuntimeError(f"prometheus not ready after {timeout:.0f}s:\n{prom.log()[-4000:]}")
        time.sleep(0.1)


@pytest.fixture
def prometheus_factory(tmp_path_factory) -> Iterator[Callable[..., PrometheusProcess]]:
    """A factory ``(targets, scrape_interval="1s", rule_files=None, ...) -> PrometheusProcess``.

    Each server gets its own temporary directory; all are stopped at teardown. Skips (fails under CI=true)
    when the binary is missing.
    """
    prometheus_binary()
    started: list[PrometheusProcess] = []

    def start(targets: Sequence[str] = (), **kwargs: Any) -> PrometheusProcess:
        prom = start_prometheus(tmp_path_factory.mktemp("prometheus"), targets, **kwargs)
        started.append(prom)
        return prom

    try:
        yield start
    finally:
        for prom in started:
            prom.stop()
