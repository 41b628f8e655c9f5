"""The KServe predictor over real HTTP on loopback: protocols, metadata, metrics, bad input, hot reload, drift."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import secrets
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Predictor, b64_png
from PIL import Image, ImageFilter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from components.pipeline import load_artifacts
from components.predict import score_images
from serving.control import control_headers
from serving.metrics import PredictorMetrics
from serving.predictor import ReloadFailed, TocoadPredictor
from serving.settings import ServingSettings

V1 = "/v1/models/tocoad:predict"
V2 = "/v2/models/tocoad/infer"


def _images(folder, pattern="*.png", n=None):
    paths = sorted(folder.rglob(pattern))[:n]
    return [np.array(Image.open(p).convert("RGB")) for p in paths]


def _version(bundle) -> str:
    return "local-" + hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:12]


def _png_bytes(image, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _token_file(folder) -> str:
    """A control token in a file, as a mounted Secret would hold it."""
    path = folder / "control-token"
    path.write_text(secrets.token_urlsafe(24) + "\n")
    return str(path)


def _metrics(url: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("tocoad_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(metrics: dict, name: str, **labels) -> float:
    return sum(
        v for (n, lab), v in metrics.items() if n == name and all((k, w) in lab for k, w in labels.items())
    )


def _mixed(serve_data, n=3) -> list[np.ndarray]:
    """``n`` normal and ``n`` defective test images."""
    defects = [
        im for d in sorted((serve_data / "test").iterdir()) if d.name != "good" for im in _images(d, n=1)
    ]
    return _images(serve_data / "test" / "good", n=n) + defects[:n]


def test_v1_v2_and_raw_match_in_process_predict(live_predictor, serve_bundles, serve_data):
    images = _mixed(serve_data)
    expected = score_images(load_artifacts(serve_bundles[0]).model(), images)
    version = _version(serve_bundles[0])

    v1 = httpx.post(live_predictor + V1, json={"instances": [{"image": {"b64": b64_png(im)}} for im in images]},
                    timeout=60).json()["predictions"]  # fmt: skip
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [b64_png(im) for im in images]}]}  # fmt: skip
    v2 = {
        o["name"]: o["data"] for o in httpx.post(live_predictor + V2, json=body, timeout=60).json()["outputs"]
    }
    raw = [httpx.post(live_predictor + V1, content=_png_bytes(im), headers={"Content-Type": "image/png"},
                      timeout=60).json()["predictions"][0] for im in images[:2]]  # fmt: skip
    for i, exp in enumerate(expected):
        assert v1[i]["score"] == pytest.approx(exp["score"], rel=1e-5)
        assert v1[i]["label"] == exp["label"] and v1[i]["normalized"] == pytest.approx(
            exp["normalized"], rel=1e-5, abs=1e-5
        )
        assert v1[i]["threshold"] == pytest.approx(exp["threshold"]) and v1[i]["model_version"] == version
        assert v2["score"][i] == pytest.approx(exp["score"], rel=1e-5) and v2["label"][i] == exp["label"]
        assert v2["model_version"][i] == version
    assert [r["score"] for r in raw] == pytest.approx([e["score"] for e in expected[:2]], rel=1e-5)
    assert {e["label"] for e in expected} == {"normal", "defective"}, expected  # the sample holds both kinds


def test_anomaly_map_and_boxes_on_request(live_predictor, serve_data):
    defect = _mixed(serve_data, n=1)[-1]
    body = {"instances": [{"image": {"b64": b64_png(defect)}}], "parameters": {"return_map": True}}
    pred = httpx.post(live_predictor + V1, json=body, timeout=60).json()["predictions"][0]
    amap = np.asarray(Image.open(io.BytesIO(base64.b64decode(pred["anomaly_map"]))))
    assert amap.shape == (64, 64) and amap.max() > amap.min()
    assert isinstance(pred["boxes"], list)
    if pred["label"] == "defective":
        assert pred["boxes"] and all(0 <= b[0] < b[2] <= 64 and 0 <= b[1] < b[3] <= 64 for b in pred["boxes"])


def test_the_predictor_logs_no_warnings(serve_bundles, serve_data, tmp_path):
    image = b64_png(np.asarray(Image.open(next((serve_data / "test").rglob("*.png"))).convert("RGB")))
    server = Predictor(serve_bundles[0], log_dir=tmp_path)
    try:
        for path in (
            "/v2/health/ready",
            "/v2/health/live",
            "/v1/models/tocoad",
            "/v2/models/tocoad",
            "/metrics",
        ):
            httpx.get(server.url + path, timeout=30).raise_for_status()
        v1 = {"instances": [{"image": {"b64": image}}]}
        httpx.post(f"{server.url}/v1/models/tocoad:predict", json=v1, timeout=60).raise_for_status()
        v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}
        httpx.post(f"{server.url}/v2/models/tocoad/infer", json=v2, timeout=60).raise_for_status()
    finally:
        server.stop()
    log = Path(server.log.name).read_text()
    # KServe's use of FastAPI's deprecated ORJSONResponse warned once per route
    assert "Warning" not in log, log


def test_metadata_and_health(live_predictor):
    meta = httpx.get(f"{live_predictor}/v2/models/tocoad", timeout=10).json()
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["score"] == "FP32"
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["label"] == "BYTES"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tocoad/ready", "/v1/models/tocoad"):
        assert httpx.get(live_predictor + path, timeout=10).status_code == 200


def test_metrics_count_a_known_sequence(live_predictor, serve_data):
    before = _metrics(live_predictor)
    images = _images(serve_data / "test", n=10)
    preds = httpx.post(live_predictor + V1, json={"instances": [{"image": {"b64": b64_png(im)}} for im in images]},
                       timeout=60).json()["predictions"]  # fmt: skip
    httpx.post(
        live_predictor + V1, content=b"not an image", headers={"Content-Type": "image/png"}, timeout=10
    )
    httpx.post(live_predictor + V1, json={"instances": "nope"}, timeout=10)
    after = _metrics(live_predictor)
    bad = sum(p["label"] == "defective" for p in preds)
    delta = {lab: _sum(after, "tocoad_predictions_total", label=lab) - _sum(before, "tocoad_predictions_total", label=lab)
             for lab in ("normal", "defective")}  # fmt: skip
    assert delta == {"normal": 10 - bad, "defective": bad}
    assert _sum(after, "tocoad_request_errors_total", kind="decode") - _sum(before, "tocoad_request_errors_total",
                                                                               kind="decode") == 1  # fmt: skip
    assert _sum(after, "tocoad_request_errors_total", kind="bad_request") - _sum(
        before, "tocoad_request_errors_total", kind="bad_request") == 1  # fmt: skip
    assert _sum(after, "tocoad_anomaly_score_count") - _sum(before, "tocoad_anomaly_score_count") == 10
    assert _sum(after, "tocoad_input_statistic_count", stat="brightness") - _sum(
        before, "tocoad_input_statistic_count", stat="brightness") == 10  # fmt: skip
    assert 0.0 <= _sum(after, "tocoad_defect_rate") <= 1.0
    assert (
        _sum(after, "tocoad_model_info") == 1 and _sum(after, "tocoad_reloads_total", result="success") == 1
    )
    assert _sum(after, "tocoad_drift_window_images") >= 10 and _sum(after, "tocoad_reload_age_seconds") > 0
    assert any(n == "tocoad_drift_psi" for n, _ in after)


# ---------------------------------------------------------------- bad input
def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` (a decompression bomb when large)."""
    raw = zlib.compress(b"\x00" * (1 + width) * 8)  # a few rows; the header is what the server must refuse on

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _bad_corpus(good_png: bytes) -> list[tuple[str, str, object, str]]:
    """(path, kind of body, body, content type) for at least 40 requests that must get a 4xx."""
    rng = np.random.default_rng(0)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    jpeg = jpeg.getvalue()
    tiny = _png_bytes(np.zeros((1, 1, 3), np.uint8))
    b64 = base64.b64encode
    raw_bodies = [good_png[:40], good_png[: len(good_png) // 2], good_png[:-20], jpeg[:30], jpeg[: len(jpeg) // 2],
                  rng.bytes(10), rng.bytes(5000), rng.bytes(200_000), b"", _png_with_size(20000, 20000),
                  _png_with_size(100_000, 8), tiny, b"GIF89a" + rng.bytes(50), b"BM" + rng.bytes(100),
                  b"%PDF-1.4 not an image"]  # fmt: skip
    corpus = [(V1, "raw", body, "image/png") for body in raw_bodies]
    corpus += [
        (V1, "json", {"instances": [{"image": {"b64": b64(body).decode()}}]}, "") for body in raw_bodies[:10]
    ]
    corpus += [
        (V1, "json", {"instances": [{"image": {"b64": "not base64!!"}}]}, ""),
        (V1, "json", {"instances": [{"image": {"b64": b64(good_png).decode()[:-3]}}]}, ""),
        (V1, "json", {"instances": [{"image": {"b64": ""}}]}, ""),
        (V1, "json", {"instances": [{"image": {"b64": 12345}}]}, ""),
        (V1, "json", {"instances": []}, ""),
        (V1, "json", {"instances": "x"}, ""),
        (V1, "json", {"inputs": []}, ""),
        (V1, "json", {}, ""),
        (V1, "json", {"instances": [{"picture": "x"}]}, ""),
        (V1, "json", {"instances": [{"image": {}}]}, ""),
        (V1, "json", {"instances": [{"image": {"b64": b64(tiny).decode()}}] * 40}, ""),
        (V1, "text", b"{not json", "application/json"),
        (V1, "text", b"[1, 2, 3]", "application/json"),
        (V1, "text", b"hello", "text/plain"),
        (V1, "text", b"<xml/>", "application/xml"),
        (V2, "json", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, ""),
        (V2, "json", {"inputs": []}, ""),
        (V2, "json", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["@@@"]}]}, ""),
        (
            V2,
            "json",
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [b64(rng.bytes(300)).decode()],
                    }
                ]
            },
            "",
        ),  # fmt: skip
        (
            V2,
            "json",
            {
                "inputs": [
                    {"name": "a", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                    {"name": "b", "datatype": "BYTES", "shape": [1], "data": ["y"]},
                ]
            },
            "",
        ),  # fmt: skip
        (V2, "json", {"nothing": True}, ""),
        ("/v1/models/wrong:predict", "json", {"instances": [{"image": {"b64": b64(good_png).decode()}}]}, ""),
        ("/v2/models/wrong/infer", "json", {"inputs": []}, ""),
        (V1, "big", b"{" + b" " * (50 * 2**20) + b"}", "application/json"),
    ]
    return corpus


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(live_predictor, serve_data):
    good = _images(serve_data / "test", n=1)[0]
    good_png = _png_bytes(good)
    reference = httpx.post(live_predictor + V1, content=good_png, headers={"Content-Type": "image/png"},
                           timeout=60).json()["predictions"][0]  # fmt: skip
    corpus = _bad_corpus(good_png)
    assert len(corpus) >= 40
    failures = []
    with httpx.Client(timeout=60) as client:
        for i, (path, kind, body, ctype) in enumerate(corpus):
            if kind == "json":
                r = client.post(live_predictor + path, json=body)
            else:
                r = client.post(live_predictor + path, content=body, headers={"Content-Type": ctype})
            try:
                error = r.json().get("error")
            except ValueError:
                error = None
            if not (400 <= r.status_code < 500) or not error:
                failures.append((i, path, kind, r.status_code, r.text[:200]))
    assert failures == []
    after = httpx.post(live_predictor + V1, content=good_png, headers={"Content-Type": "image/png"},
                       timeout=60).json()["predictions"][0]  # fmt: skip
    assert after["score"] == pytest.approx(reference["score"], rel=1e-6)


def test_odd_but_valid_images_are_scored(live_predictor, serve_data):
    """CMYK, 16-bit, palette and animated GIF decode to RGB like the training images do; they get a score."""
    img = _images(serve_data / "test", n=1)[0]
    bodies = {}
    buf = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(buf, format="JPEG")
    bodies["cmyk"] = buf.getvalue()
    bodies["16bit"] = _png_bytes(img[..., 0].astype(np.uint16) * 257)
    bodies["palette"] = _png_bytes(np.asarray(Image.fromarray(img).convert("P")))
    buf = io.BytesIO()
    frames = [Image.fromarray(img), Image.fromarray(255 - img)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    bodies["gif"] = buf.getvalue()
    types = {"cmyk": "image/jpeg", "16bit": "image/png", "palette": "image/png", "gif": "image/gif"}
    for name, body in bodies.items():
        r = httpx.post(live_predictor + V1, content=body, headers={"Content-Type": types[name]}, timeout=60)
        assert r.status_code == 200, (name, r.text)
        assert np.isfinite(r.json()["predictions"][0]["score"])


# ---------------------------------------------------------------- hot reload
def _point(link, target) -> None:
    """Re-point the symlink ``link`` at ``target`` in one step."""
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def test_hot_reload_under_load_drops_nothing(serve_bundles, serve_data, tmp_path):
    """The server serves the folder ``served``; between reloads the test swaps what it holds (as a storage
    initializer would), and a reload re-reads it."""
    b0, b1, corrupt = serve_bundles
    versions = {_version(b0), _version(b1)}
    served = tmp_path / "served"
    _point(served, b0)
    token = _token_file(tmp_path)
    server = Predictor(served, env={"TOCOAD_SERVE_CONTROL_TOKEN_FILE": token})
    png = _png_bytes(_images(serve_data / "test", n=1)[0])
    stop, seen, failed = threading.Event(), [], []

    def client():
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post(server.url + V1, content=png, headers={"Content-Type": "image/png"})
                    if r.status_code != 200:
                        failed.append(r.status_code)
                    else:
                        seen.append(r.json()["predictions"][0]["model_version"])
                except httpx.HTTPError as exc:
                    failed.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    results = []
    try:
        for i in range(10):
            target = corrupt if i % 4 == 3 else (b1 if i % 2 == 0 else b0)
            _point(served, target)
            r = httpx.post(
                f"{server.url}/v2/models/tocoad/reload", headers=control_headers(token), timeout=120
            )
            results.append((target, r.status_code, r.json()))
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        metrics = _metrics(server.url)
        server.stop()
    assert failed == [] and len(seen) > 20
    assert set(seen) == versions  # every response names the version it used; both were served
    for target, status, body in results:
        if target == corrupt:
            assert status == 409 and body["serving"] in versions and "checksum" in body["error"]
        else:
            assert status == 200 and body["version"] == _version(target)
    assert _sum(metrics, "tocoad_reloads_total", result="failure") == 2
    assert _sum(metrics, "tocoad_reloads_total", result="success") == 1 + 8


# ---------------------------------------------------------------- drift
def _feed(predictor: TocoadPredictor, images: list[np.ndarray]) -> dict[str, float]:
    for i in range(0, len(images), 8):
        body = {"instances": [{"image": {"b64": b64_png(im)}} for im in images[i : i + 8]]}
        asyncio.run(predictor.predict(body))
    return predictor.drift.snapshot()


def test_drift_shows_under_a_real_shift_and_stays_quiet_on_normal_images(serve_bundles, serve_data):
    settings = ServingSettings(drift_window=60, drift_min_images=10)
    normal = _images(serve_data / "train") + _images(serve_data / "test" / "good")

    def fresh() -> TocoadPredictor:
        p = TocoadPredictor("tocoad", str(serve_bundles[0]), settings, PredictorMetrics(CollectorRegistry()))
        p.load()
        return p

    quiet = _feed(fresh(), normal)
    dark = _feed(fresh(), [(im * 0.45).astype(np.uint8) for im in normal])
    blur = _feed(
        fresh(), [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(2))) for im in normal]
    )
    assert max(quiet["psi_brightness"], quiet["psi_contrast"], quiet["psi_sharpness"]) < 0.25, quiet
    assert dark["psi_brightness"] > 0.25 and dark["psi_brightness"] > 5 * quiet["psi_brightness"], dark
    assert blur["psi_sharpness"] > 0.25, blur
    assert dark["nn_exceedance"] > quiet["nn_exceedance"]


def test_reload_of_a_corrupt_bundle_is_refused_in_process(serve_bundles):
    p = TocoadPredictor(
        "tocoad", str(serve_bundles[0]), ServingSettings(), PredictorMetrics(CollectorRegistry())
    )
    p.load()
    served = p.current
    with pytest.raises(ReloadFailed, match="checksum"):
        p.reload(str(serve_bundles[2]))
    assert p.current is served


def test_serves_the_registry_production_alias_and_follows_a_promotion(s3_server, serve_bundles, serve_data,
                                                                     tmp_path, monkeypatch):  # fmt: skip
    """The predictor identity pulls `production` through the registry; the flow's local deploy (a reload with the
    control token) follows a promotion."""
    from flows.deploy import deploy_version
    from storage.registry import ModelRegistry
    from storage.store import ArtifactStore

    registry = ModelRegistry(ArtifactStore(progress=False))
    first = registry.register("served", serve_bundles[0], alias="production").version
    second = registry.register("served", serve_bundles[1]).version
    token = _token_file(tmp_path)
    server = Predictor("s3://models/served/production", env={"TOCOAD_SERVE_CONTROL_TOKEN_FILE": token},
                       log_dir=tmp_path)  # fmt: skip
    try:
        png = _png_bytes(_images(serve_data / "test", n=1)[0])

        def version() -> str:
            r = httpx.post(server.url + V1, content=png, headers={"Content-Type": "image/png"}, timeout=60)
            return r.json()["predictions"][0]["model_version"]

        assert version() == first
        registry.promote("served", second)
        monkeypatch.setenv("TOCOAD_SERVE_CONTROL_TOKEN_FILE", token)
        monkeypatch.setenv("TOCOAD_PREDICTOR_URL", server.url)
        assert "HTTP 200" in deploy_version("served", registry.uri("served", second), cluster=False)
        assert version() == second
        info = _metrics(server.url)
        assert _sum(info, "tocoad_model_info", version=second) == 1 and _sum(info, "tocoad_model_info") == 1
    finally:
        server.stop()
