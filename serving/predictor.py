"""The KServe model: scores images (V1, V2 and raw bodies), swaps models atomically on reload, exports metrics.

Hot reload: a new bundle loads beside the served one; only when it is fully loaded and warmed up does one
reference assignment make it current. A request takes a reference to the current model when it starts and
finishes on that model, so nothing in flight is dropped. A bundle that fails to load (or fails its checksums)
is refused, counted in ``tocoad_reloads_total{result="failure"}``, and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import io
import json
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from kserve import Model
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from PIL import Image
from scipy import ndimage

from components.predict import describe_scores, prepare
from components.profile import image_statistics
from serving.control import follows
from serving.drift import STATS, DriftMonitor
from serving.inputs import BadRequest, Batch, Limits, parse_body, parse_v1, parse_v2
from serving.loading import LoadedModel, load_model
from serving.metrics import PredictorMetrics, default_metrics
from serving.settings import ServingSettings

log = logging.getLogger("tocoad.serving")
# Set by the HTTP middleware per request: the predictor notes the kind of a refusal there, and the middleware
# counts every 4xx/5xx once, including the ones KServe raises before the predictor sees the request.
ERROR_KIND: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tocoad_error_kind", default=None)
OUTPUTS = [
    ("score", "FP32"),
    ("normalized", "FP32"),
    ("label", "BYTES"),
    ("threshold", "FP32"),
    ("model_version", "BYTES"),
    ("boxes", "BYTES"),
    ("anomaly_map", "BYTES"),
]


class ReloadFailed(RuntimeError):
    """A new bundle could not be loaded; the old model keeps serving."""


class TocoadPredictor(Model):
    """``kserve.Model`` serving one tocoad model, with hot reload, defect-rate and drift metrics."""

    def __init__(self, name: str, storage_uri: str, settings: ServingSettings | None = None,
                 metrics: PredictorMetrics | None = None):  # fmt: skip
        super().__init__(name)
        self.origin = storage_uri  # what the server was started for: reloads may name only this model
        self.storage_uri = storage_uri
        self.settings = settings or ServingSettings()
        self.metrics = metrics or default_metrics()
        self.current: LoadedModel | None = None
        self.drift: DriftMonitor | None = None
        self._labels: deque[bool] = deque(maxlen=self.settings.defect_window)
        self._reload_lock = threading.Lock()
        self._decoding = asyncio.Semaphore(self.settings.max_concurrent_decodes)
        self.metrics.reload_age.labels(name).set_function(
            lambda: time.time() - self.current.loaded_at if self.current else 0.0
        )

    # ------------------------------------------------------------------ loading
    def load(self) -> bool:
        """Load and warm up the model at ``storage_uri``; ready only afterwards."""
        self.reload(self.storage_uri)
        return self.ready

    async def healthy(self) -> bool:
        """Ready only while a model is loaded."""
        return self.ready and self.current is not None

    def unload(self) -> None:
        """Stop serving: not ready, no model in memory, until :meth:`load` runs again."""
        with self._reload_lock:
            self.ready = False
            old, self.current = self.current, None
            if old is not None:
                self._forget(old)
                log.info("unloaded %s version %s", self.name, old.version)

    def reload(self, uri: str | None = None) -> LoadedModel:
        """Load ``uri`` (default: the current storage URI) beside the served model, then swap atomically."""
        with self._reload_lock:
            uri = uri or self.storage_uri
            try:
                new = load_model(uri, self.name)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old model
                self.metrics.reloads.labels(self.name, "failure").inc()
                log.error("reload of %s refused, still serving %s: %s", uri,
                          self.current.version if self.current else "nothing", exc)  # fmt: skip
                raise ReloadFailed(f"could not load {uri}: {exc}") from exc
            new.lock = threading.Lock()
            old = self.current
            self.drift = DriftMonitor(new.profile, self.settings.drift_window, self.settings.drift_bins)
            self._labels = deque(maxlen=self.settings.defect_window)
            self.current = new  # the swap: one reference assignment
            self.storage_uri = uri
            self.ready = True
            if old is not None:
                self._forget(old, versioned=old.version != new.version)
            self.metrics.info.labels(*self._info_labels(new)).set(1)
            self.metrics.loaded_at.labels(self.name).set(new.loaded_at)
            self.metrics.reloads.labels(self.name, "success").inc()
            log.info("serving %s version %s from %s (%s)", self.name, new.version, uri,
                     ", ".join(f"{k} {v:.2f}" for k, v in new.timings.items()))  # fmt: skip
            return new

    def _info_labels(self, loaded: LoadedModel) -> tuple[str, str, str, str]:
        """``tocoad_model_info``'s labels: model, version, URI, and the alias it follows (empty: pinned)."""
        return self.name, loaded.version, loaded.uri, follows(loaded.uri)

    def parameters(self) -> dict[str, str]:
        """What the server follows: ``following`` (an alias) or ``pinned`` (a version), and its storage URI."""
        alias = follows(self.storage_uri)
        state = {"following": alias} if alias else {"pinned": self.current.version if self.current else ""}
        return {**state, "storage_uri": self.storage_uri}

    def _forget(self, old: LoadedModel, versioned: bool = True) -> None:
        """Drop the info series of a model no longer served and, when ``versioned``, its version's label sets
        (their counters stay in Prometheus' TSDB)."""
        with contextlib.suppress(KeyError):
            self.metrics.info.remove(*self._info_labels(old))
        if not versioned:
            return
        for family, labels in ((self.metrics.defect_rate, (self.name, old.version)),
                               (self.metrics.ks, (self.name, old.version)),
                               (self.metrics.nn_exceed, (self.name, old.version)),
                               (self.metrics.window, (self.name, old.version))):  # fmt: skip
            with contextlib.suppress(KeyError):
                family.remove(*labels)
        for feature in ("score", *STATS):
            with contextlib.suppress(KeyError):
                self.metrics.psi.remove(self.name, old.version, feature)

    # ------------------------------------------------------------------ metadata
    def get_input_types(self) -> list[dict]:
        """V2 metadata: one BYTES input of base64-encoded images."""
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        """V2 metadata: per image score, normalised score, label, threshold, version, boxes (JSON), map (PNG)."""
        return [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS]

    # ------------------------------------------------------------------ predict
    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        """Score a V1, V2 or raw-image request: decoding and scoring run in a worker thread, never on the event
        loop, at most ``max_concurrent_decodes`` requests at once."""
        start = time.perf_counter()
        loaded = self.current  # this request finishes on this model, whatever reloads meanwhile
        if loaded is None:
            raise ModelNotReady(self.name, "No model is loaded.")
        try:
            async with self._decoding:
                batch, results = await asyncio.to_thread(self._run, loaded, payload, headers or {})
        except BadRequest as exc:
            self._error(exc.kind)
            raise InvalidInput(str(exc)) from None
        except Exception:
            self._error("internal")
            raise
        self.metrics.latency.labels(self.name, batch.protocol).observe(time.perf_counter() - start)
        self.metrics.batch.labels(self.name).observe(len(batch.images))
        if batch.protocol == "v2":
            return self._v2_response(payload, results, loaded)
        return {"predictions": results, "model_name": self.name, "model_version": loaded.version}

    def validate(self, payload: Any) -> Any:
        """Accept any payload here: :meth:`predict` checks it and explains what is wrong."""
        return payload

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        """No explainer: the anomaly map (``"parameters": {"return_map": true}``) shows where and why."""
        self._error("bad_request")
        raise NotImplementedError("this predictor has no explainer; ask for the anomaly map with return_map")

    def _error(self, kind: str) -> None:
        holder = ERROR_KIND.get()
        if holder is None:  # called in-process, not over HTTP: count here
            self.metrics.errors.labels(self.name, kind).inc()
        else:
            holder["kind"] = kind

    def _run(self, loaded: LoadedModel, payload: Any, headers: dict[str, str]) -> tuple[Batch, list[dict]]:
        batch = self._parse(payload, headers, Limits.for_model(self.settings, loaded.model.image_size))
        return batch, self._score(loaded, batch)

    @staticmethod
    def _parse(payload: Any, headers: dict[str, str], limits: Limits) -> Batch:
        if isinstance(payload, InferRequest):
            return parse_v2(payload, limits)
        if isinstance(payload, dict):
            return parse_v1(payload, limits)
        if isinstance(payload, bytes | bytearray):
            content_type = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
            return parse_body(bytes(payload), content_type, limits)
        raise BadRequest("bad_request", "send V1 JSON, a V2 inference request, or an image body")

    def _score(self, loaded: LoadedModel, batch: Batch) -> list[dict[str, Any]]:
        model = loaded.model
        x = prepare(batch.images, model.image_size)
        with loaded.lock, torch.inference_mode():
            pred = model.predict(x, with_maps=batch.return_map)
        cal = model.calibration
        stats = image_statistics(x)
        results = describe_scores(pred.scores, cal)
        for i, item in enumerate(results):
            item["id"] = batch.ids[i] if i < len(batch.ids) else str(i)
            item["model_version"] = loaded.version
            if batch.return_map and pred.maps is not None:
                item["anomaly_map"] = self._map_png(pred.maps[i], cal)
                item["boxes"] = self._boxes(pred.maps[i], cal, batch.images[i].shape[:2])
        defective = np.array([item["label"] == "defective" for item in results])
        self._observe(loaded, results, pred.scores, defective, stats, pred.patch_scores)
        return results

    def _map_png(self, amap: np.ndarray, cal) -> str:
        size = self.settings.map_size
        small = F.interpolate(torch.from_numpy(amap)[None, None].float(), size=(size, size), mode="area")[
            0, 0
        ]
        vmax = cal.pixel_max or float(amap.max()) or 1.0
        img = (small.clamp(0, vmax) / vmax * 255).round().byte().numpy()
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    @staticmethod
    def _boxes(amap: np.ndarray, cal, image_hw: tuple[int, int]) -> list[list[int]]:
        """Bounding boxes ``[x0, y0, x1, y1]`` (original pixels) of map regions above the pixel threshold (or the
        image threshold, when that is lower: the blurred map of a defective image may stay under the former)."""
        thr = min(cal.pixel_threshold or np.inf, cal.threshold)
        regions, _ = ndimage.label(amap >= thr)
        sy, sx = image_hw[0] / amap.shape[0], image_hw[1] / amap.shape[1]
        return [[int(s[1].start * sx), int(s[0].start * sy), int(s[1].stop * sx), int(s[0].stop * sy)]
                for s in ndimage.find_objects(regions) if s is not None]  # fmt: skip

    def _observe(self, loaded, results, raw, defective, stats, patch_scores) -> None:
        m, labels = self.metrics, (self.name, loaded.version)
        for item in results:
            m.predictions.labels(*labels, item["label"]).inc()
            m.score.labels(*labels).observe(item["normalized"])
        for name in STATS:
            for value in stats[name]:
                m.statistic.labels(*labels, name).observe(float(value))
        if loaded is not self.current:
            return  # a request that finished on the old model after a swap: no window/drift updates
        self._labels.extend(bool(d) for d in defective)
        m.defect_rate.labels(*labels).set(sum(self._labels) / len(self._labels))
        drift = self.drift
        drift.add(raw, defective, stats, patch_scores)
        snap = drift.snapshot()
        m.window.labels(*labels).set(snap["window"])
        if drift.size >= self.settings.drift_min_images:
            m.nn_exceed.labels(*labels).set(snap["nn_exceedance"])
            if "ks_score" in snap:
                m.ks.labels(*labels).set(snap["ks_score"])
            for feature in ("score", *STATS):
                if f"psi_{feature}" in snap:
                    m.psi.labels(*labels, feature).set(snap[f"psi_{feature}"])

    def _v2_response(self, request: InferRequest, results: list[dict], loaded: LoadedModel) -> InferResponse:
        n = len(results)

        def col(name: str, dtype: str, values: list) -> InferOutput:
            return InferOutput(name=name, shape=[n], datatype=dtype, data=values)

        outputs = [
            col("score", "FP32", [r["score"] for r in results]),
            col("normalized", "FP32", [r["normalized"] for r in results]),
            col("label", "BYTES", [r["label"] for r in results]),
            col("threshold", "FP32", [r["threshold"] for r in results]),
            col("model_version", "BYTES", [r["model_version"] for r in results]),
        ]
        if "anomaly_map" in results[0]:
            outputs.append(col("boxes", "BYTES", [json.dumps(r["boxes"]) for r in results]))
            outputs.append(col("anomaly_map", "BYTES", [r["anomaly_map"] for r in results]))
        return InferResponse(response_id=request.id or "", model_name=self.name, infer_outputs=outputs,
                             model_version=loaded.version)  # fmt: skip
