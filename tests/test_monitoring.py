"""k8s/monitoring: Prometheus rules (promtool check + unit tests), the PrometheusRule/PodMonitor/ConfigMap
manifests, and the Grafana dashboard, whose every query runs against a real Prometheus.

- the rules file is the one source; the PrometheusRule and the dashboard ConfigMap are generated from it and
  dashboard.json by k8s/monitoring/build_rules.py, and must be in sync;
- every dashboard query is valid PromQL (a real Prometheus with the rules loaded accepts it), returns data for
  metrics of the predictor's shape (a simulated predictor: serving/metrics.py on a prometheus_client server),
  and returns data when Prometheus scrapes the real predictor (the ``live_predictor`` fixture of conftest.py).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_util
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_util import PrometheusError, free_port, promtool_binary

from serving.metrics import DRIFT_FEATURES, ERROR_KINDS, PredictorMetrics

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
MON = K8S / "monitoring"
RULES = MON / "rules" / "tocoad-rules.yaml"
RULE_TESTS = MON / "tests" / "tocoad-rules.test.yaml"
DASHBOARD = MON / "dashboard.json"
K8S_VERSIONS = ("1.34.0", "1.37.0")  # as tests/test_k8s_minio.py

ALERTS = {
    "TocoadDefectRateHigh",
    "TocoadInputDrift",
    "TocoadNNDistanceDrift",
    "TocoadErrorRateHigh",
    "TocoadNoPredictions",
    "TocoadReloadFailed",
    "TocoadModelStale",
}
RECORDS = {
    "tocoad:predictions:rate5m",
    "tocoad:defect_rate:5m",
    "tocoad:request_errors:rate5m",
    "tocoad:error_ratio:5m",
    "tocoad:latency_seconds:p50_5m",
    "tocoad:latency_seconds:p95_5m",
    "tocoad:drift_psi:max",
}
# Grafana's variables, as the tests resolve them: all models, and fixed intervals.
SUBSTITUTIONS = (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "5m"), ("$model", ".*"))
# Counters the predictor creates only when the event happens: a live predictor that served no bad request
# has no tocoad_request_errors_total series, so a query of only these may be empty in the live test.
EVENT_ONLY = {"tocoad_request_errors_total"}

prometheus_factory = prometheus_util.prometheus_factory  # the fixture


def _build_rules():
    """k8s/monitoring/build_rules.py as a module (k8s/ is no package)."""
    spec = importlib.util.spec_from_file_location("build_rules", MON / "build_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load(RULES)[0]["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    """Every panel but rows (also panels nested in collapsed rows)."""
    out = []
    for panel in _dashboard()["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def _resolve(expr: str) -> str:
    for var, value in SUBSTITUTIONS:
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unresolved Grafana variable in {expr!r}"
    return expr


def _queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, resolved expr) of every target of every panel."""
    return [(p["title"], t["refId"], _resolve(t["expr"])) for p in _panels() for t in p["targets"]]


def _names(expr: str) -> set[str]:
    """The tocoad metric and recording-rule names an expression reads."""
    return set(re.findall(r"\btocoad[a-zA-Z0-9_:]*", expr))


def _exposed_names() -> dict[str, str]:
    """Every series name the predictor exposes (serving/metrics.py), with the name of its family."""
    registry = CollectorRegistry()
    PredictorMetrics(registry=registry)
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}
    return {family.name + s: family.name for family in registry.collect() for s in suffixes[family.type]}


def _run(cmd: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


# --- promtool ------------------------------------------------------------------------------------------------


def test_promtool_check_rules():
    out = _run([promtool_binary(), "check", "rules", str(RULES)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in out.stdout


def test_promtool_unit_tests_pass():
    out = _run([promtool_binary(), "test", "rules", str(RULE_TESTS.relative_to(REPO))])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


# Each mutation breaks one rule the way a plausible simpler version would; the unit tests must notice.
MUTATIONS = {
    "TocoadInputDrift": ("\n  and ignoring (feature)\n    tocoad_drift_window_images >= 50", ""),
    "TocoadDefectRateHigh": ("tocoad:defect_rate:5m > 0.2", "tocoad:defect_rate:5m > 0.4"),
    "TocoadReloadFailed": ('tocoad_reloads_total{result="failure"} > 0\n', "tocoad_reloads_total > 1e9\n"),
    "TocoadNoPredictions": (
        "max by (model, version) (tocoad_model_info == 1)\nunless on (model)\n",
        "max by (model, version) (tocoad_model_info == 1)\nand on (model)\n",
    ),  # fmt: skip
}


@pytest.mark.parametrize("alert", sorted(MUTATIONS))
def test_promtool_unit_tests_catch_a_broken_rule(alert, tmp_path):
    old, new = MUTATIONS[alert]
    doc = _load(RULES)[0]
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    assert old in rule["expr"], rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(yaml.safe_dump(doc))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    out = _run([promtool_binary(), "test", "rules", f"tests/{RULE_TESTS.name}"], cwd=tmp_path)
    assert out.returncode != 0, out.stdout
    assert f"alertname: {alert}" in out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_not_firing_and_every_record_checked():
    tests = _load(RULE_TESTS)[0]
    assert tests["rule_files"] == [os.path.relpath(RULES, RULE_TESTS.parent)]
    firing: set[str] = set()
    quiet: set[str] = set()
    exprs = []
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
            for alert in t.get("exp_alerts") or []:
                assert set(alert["exp_annotations"]) == {"summary", "description"}
        exprs += [t["expr"] for t in case.get("promql_expr_test", [])]
    assert firing == ALERTS
    assert quiet == ALERTS
    assert set().union(*map(_names, exprs)) == RECORDS


# --- the rules ------------------------------------------------------------------------------------------------


def test_rules_names_labels_and_contract():
    doc = _load(RULES)[0]
    assert [g["name"] for g in doc["groups"]] == ["tocoad.recording", "tocoad.alerts"]
    assert doc["groups"][0]["interval"] == "30s"
    rules = _rules()
    assert {r["record"] for r in rules if "record" in r} == RECORDS
    assert {r["alert"] for r in rules if "alert" in r} == ALERTS
    known = set(_exposed_names()) | RECORDS
    for rule in rules:
        assert _names(rule["expr"]) and _names(rule["expr"]) <= known, rule["expr"]
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
            assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
            assert "{{ $labels.model }}" in rule["annotations"]["summary"], rule["alert"]
    by_alert = {r["alert"]: r for r in rules if "alert" in r}
    assert by_alert["TocoadDefectRateHigh"]["for"] == "10m"
    assert by_alert["TocoadInputDrift"]["for"] == "15m"
    assert by_alert["TocoadNNDistanceDrift"]["for"] == "15m"
    assert by_alert["TocoadErrorRateHigh"]["for"] == "5m"
    assert by_alert["TocoadNoPredictions"]["for"] == "30m"


# --- manifests ------------------------------------------------------------------------------------------------


def test_generated_manifests_are_in_sync():
    build = _build_rules()
    for path, text in build.render().items():
        assert path.read_text() == text, (
            f"{path.name} is out of date: run `python k8s/monitoring/build_rules.py`"
        )
    assert build.main(["--check"]) == 0
    (rule,) = _load(MON / "prometheus-rules.yaml")
    assert rule["spec"] == _load(RULES)[0]
    (cm,) = _load(MON / "dashboard-configmap.yaml")
    assert cm["data"] == {"tocoad-predictor.json": DASHBOARD.read_text()}


RULE_GROUP_KEYS = {"name", "interval", "rules", "limit", "partial_response_strategy"}
RULE_KEYS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


def test_prometheus_rule_structure(tmp_path):
    (rule,) = _load(MON / "prometheus-rules.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    meta = rule["metadata"]
    assert (meta["name"], meta["namespace"]) == ("tocoad-predictor", "tocoad")
    assert meta["labels"]["release"] == "prometheus"
    assert set(rule["spec"]) == {"groups"}
    names = [g["name"] for g in rule["spec"]["groups"]]
    assert len(names) == len(set(names))
    for group in rule["spec"]["groups"]:
        assert set(group) <= RULE_GROUP_KEYS and group["rules"], group["name"]
        for r in group["rules"]:
            assert set(r) <= RULE_KEYS and ("record" in r) != ("alert" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip()
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in r.get(key, {}).values()), (r, key)
    # what the operator hands to Prometheus is a valid rules file
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    out = _run([promtool_binary(), "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_podmonitor_structure():
    (pm,) = _load(MON / "podmonitor.yaml")
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert set(pm) == {"apiVersion", "kind", "metadata", "spec"}
    assert (pm["metadata"]["name"], pm["metadata"]["namespace"]) == ("tocoad-predictor", "tocoad")
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    assert set(pm["spec"]) == {"selector", "podMetricsEndpoints"}
    assert pm["spec"]["selector"] == {"matchLabels": {"serving.kserve.io/inferenceservice": "tocoad"}}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "http1", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    # the port exists, under that name, on the predictor container of k8s/serving
    isvc_path = K8S / "serving" / "inferenceservice.yaml"
    if isvc_path.exists():
        (isvc,) = [d for d in _load(isvc_path) if d["kind"] == "InferenceService"]
        assert isvc["metadata"]["name"] == "tocoad"
        ports = [p for c in isvc["spec"]["predictor"]["containers"] for p in c.get("ports", [])]
        assert {"name": "http1", "containerPort": 8080} in [
            {k: p[k] for k in ("name", "containerPort")} for p in ports
        ]


def test_dashboard_configmap_passes_strict_validation():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    (cm,) = _load(MON / "dashboard-configmap.yaml")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("tocoad-dashboard", "tocoad")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(cm, version, strict=True)
    broken = copy.deepcopy(cm)
    broken["metadata"]["labelz"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomizations():
    kust = _load(MON / "kustomization.yaml")[0]
    on_disk = {p.name for p in MON.iterdir() if p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk and len(kust["resources"]) == len(on_disk)
    assert "monitoring" in _load(K8S / "kustomization.yaml")[0]["resources"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_build():
    out = _run(["kubectl", "kustomize", str(MON)])
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    for doc in docs:
        assert doc["metadata"]["namespace"] == "tocoad"
        (source,) = [d for name in ("podmonitor.yaml", "prometheus-rules.yaml", "dashboard-configmap.yaml")
                     for d in _load(MON / name) if d["kind"] == doc["kind"]]  # fmt: skip
        assert doc == source


# --- the dashboard --------------------------------------------------------------------------------------------


def test_dashboard_structure():
    dash = _dashboard()
    assert (dash["schemaVersion"], dash["uid"]) == (39, "tocoad-predictor")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    model = variables["model"]
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert (model["type"], query) == ("query", "label_values(tocoad_model_info, model)")
    assert model["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    types = set()
    for panel in _panels():
        types.add(panel["type"])
        assert panel["title"] and panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'model=~"$model"' in target["expr"], (panel["title"], target["expr"])
    assert {"timeseries", "heatmap", "gauge", "stat", "table"} <= types
    (heatmap,) = [p for p in _panels() if p["type"] == "heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert heatmap["targets"][0]["expr"] == (
        'sum by (le) (rate(tocoad_anomaly_score_bucket{model=~"$model"}[$__rate_interval]))'
    )


def test_dashboard_reads_every_metric_of_the_contract():
    read = set().union(*(_names(expr) for _, _, expr in _queries()))
    exposed = _exposed_names()
    assert read <= set(exposed) | RECORDS, read - set(exposed) - RECORDS
    assert {exposed[name] for name in read if name in exposed} == set(exposed.values())  # every family
    assert {"tocoad:defect_rate:5m", "tocoad:error_ratio:5m"} <= read


# --- the dashboard against a real Prometheus -----------------------------------------------------------------


def _test_rules(tmp_path: Path) -> Path:
    """The rules file with the groups' own intervals dropped, so the test's evaluation_interval (1s) applies."""
    doc = _load(RULES)[0]
    for group in doc["groups"]:
        group.pop("interval", None)
    path = tmp_path / "tocoad-rules.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_dashboard_queries_are_valid_promql(prometheus_factory, tmp_path):
    prom = prometheus_factory([], rule_files=[_test_rules(tmp_path)])
    groups = {g["name"]: g for g in prom.rules()}
    assert set(groups) == {"tocoad.recording", "tocoad.alerts"}
    assert len(_queries()) >= 20
    for title, ref, expr in _queries():
        try:
            prom.query(expr)
        except PrometheusError as err:
            pytest.fail(f"panel {title!r} target {ref}: {err}")
    # the check has teeth
    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query('sum by (le) (rate(tocoad_anomaly_score_bucket{model=~".*"}[1m])')
    with pytest.raises(PrometheusError):
        prom.query("histogram_quantile(0.5, rate(tocoad_request_seconds_bucket[$__rate_interval]))")


def _assert_queries_return_data(prom, event_only_may_be_empty: bool, timeout: float = 30.0) -> list[str]:
    """Poll every dashboard query until all return a series (rate() needs two scrapes, a rule one evaluation).

    With ``event_only_may_be_empty``, queries that read only EVENT_ONLY counters are not waited for; returns
    those of them that had no data (the rest must have data, or the test fails).
    """
    models = prom.wait_for("tocoad_model_info", timeout=timeout)
    assert all(s["metric"]["model"] for s in models)
    assert prom.label_values("model", "tocoad_model_info")  # the `model` variable has values
    queries = _queries()
    optional = [q for q in queries if event_only_may_be_empty and _names(q[2]) <= EVENT_ONLY]
    pending = [q for q in queries if q not in optional]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [(title, ref, expr) for title, ref, expr in pending if not prom.query(expr)]
        if pending:
            time.sleep(0.5)
    assert not pending, "queries without data:\n" + "\n".join(f"  {t} [{r}]: {e}" for t, r, e in pending)
    # every panel shows something, and the rules evaluated without error on these series
    empty_optional = [(t, r, e) for t, r, e in optional if not prom.query(e)]
    with_data = {title for title, ref, expr in queries if (title, ref, expr) not in empty_optional}
    assert with_data == {title for title, _, _ in queries}, "panels without data"
    for group in prom.rules():
        for rule in group["rules"]:
            assert rule["health"] != "err", (rule["name"], rule.get("lastError"))
    return [f"{t} [{r}]" for t, r, _ in empty_optional]


@contextlib.contextmanager
def simulated_predictor(model: str = "bottle", version: str = "v2") -> Iterator[str]:
    """SIMULATION, not the predictor: serving/metrics.py's families on a prometheus_client HTTP server, fed by
    a thread with traffic, errors, drift and a reload. Yields ``127.0.0.1:PORT``."""
    registry = CollectorRegistry()
    m = PredictorMetrics(registry=registry)
    rng = random.Random(0)
    uri = f"s3://models/{model}/{version}"
    m.info.labels(model, version, uri, "").set(1)  # a pinned version: follows no alias
    m.reloads.labels(model, "success").inc()
    m.reloads.labels(model, "failure")
    loaded_at = time.time() - 3600
    m.loaded_at.labels(model).set(loaded_at)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            for protocol in ("v1", "v2"):
                batch = rng.randint(1, 8)
                for _ in range(batch):
                    score = rng.uniform(0.0, 1.0)
                    m.predictions.labels(model, version, "defective" if score > 0.5 else "normal").inc()
                    m.score.labels(model, version).observe(score)
                    for stat in ("brightness", "contrast", "sharpness"):
                        m.statistic.labels(model, version, stat).observe(rng.uniform(0.05, 0.9))
                m.latency.labels(model, protocol).observe(rng.uniform(0.005, 0.3))
                m.batch.labels(model).observe(batch)
            m.errors.labels(model, rng.choice(ERROR_KINDS)).inc()
            m.defect_rate.labels(model, version).set(0.5)
            for feature in DRIFT_FEATURES:
                m.psi.labels(model, version, feature).set(0.6 if feature == "brightness" else 0.03)
            m.ks.labels(model, version).set(0.1)
            m.nn_exceed.labels(model, version).set(0.02)
            m.window.labels(model, version).set(200)
            m.reload_age.labels(model).set(time.time() - loaded_at)
            stop.wait(0.1)

    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(5)
        server.shutdown()
        server.server_close()


def test_dashboard_queries_return_data_simulated_predictor(prometheus_factory, tmp_path):
    """SIMULATED predictor (serving/metrics.py on prometheus_client): every query returns data."""
    with simulated_predictor() as target:
        prom = prometheus_factory([target], rule_files=[_test_rules(tmp_path)])
        _assert_queries_return_data(prom, event_only_may_be_empty=False)
        # the rules see what the simulation produces
        assert prom.wait_for('tocoad:drift_psi:max{model="bottle"} == 0.6')
        assert prom.wait_for('tocoad:defect_rate:5m{model="bottle"} > 0.2')
        assert prom.wait_for(
            'ALERTS{alertname="TocoadInputDrift", feature="brightness", alertstate="pending"}'
        )


def test_dashboard_queries_return_data(live_predictor, prometheus_factory, tmp_path):
    """The real predictor (conftest.py ``live_predictor``: it has served normal and defective images)."""
    target = live_predictor.removeprefix("http://").removeprefix("https://").rstrip("/")
    prom = prometheus_factory([target], rule_files=[_test_rules(tmp_path)])
    empty = _assert_queries_return_data(prom, event_only_may_be_empty=True)
    assert empty in ([], ["Errors by kind [A]"])  # no request error served yet: no error counter


def test_a_missing_binary_skips_or_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="tocoad-no-such-tool not found"):
        prometheus_util.require_binary("tocoad-no-such-tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="tocoad-no-such-tool not found"):
        prometheus_util.require_binary("tocoad-no-such-tool")
