"""The predictor's Prometheus metrics, on the same ``/metrics`` KServe serves (prometheus_client's registry).

Every series carries ``model`` (and, where it belongs to one model version, ``version``). Names:

=========================================  =========  ==========================================================
``tocoad_predictions_total``               counter    images scored, by ``label`` (normal | defective)
``tocoad_defect_rate``                     gauge      share of defective images over the last ``window`` images
``tocoad_anomaly_score``                   histogram  normalised score (0.5 = threshold)
``tocoad_input_statistic``                 histogram  input image ``stat`` = brightness | contrast | sharpness
``tocoad_request_errors_total``            counter    rejected or failed requests, by ``kind``
``tocoad_request_seconds``                 histogram  request latency, by ``protocol`` (v1 | v2 | raw)
``tocoad_batch_images``                    histogram  images per request
``tocoad_model_info``                      gauge      1 for the served version (labels ``version``, ``uri``, and
                                                      ``follows``: the alias it follows, empty when pinned)
``tocoad_reloads_total``                   counter    reload attempts, by ``result`` (success | failure)
``tocoad_last_reload_timestamp_seconds``   gauge      when the served version was loaded
``tocoad_reload_age_seconds``              gauge      seconds since then (computed at scrape time)
``tocoad_drift_psi``                       gauge      PSI of live vs training, by ``feature`` (score | brightness |
                                                      contrast | sharpness)
``tocoad_drift_ks``                        gauge      KS statistic of normal-classed scores vs training
``tocoad_drift_nn_exceedance``             gauge      share of live patches above the training p99 NN distance
``tocoad_drift_window_images``             gauge      images in the drift window
=========================================  =========  ==========================================================
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0, 5.0)
STAT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ERROR_KINDS = ("decode", "too_large", "bad_request", "unknown_model", "not_ready", "internal")
DRIFT_FEATURES = ("score", "brightness", "contrast", "sharpness")


class PredictorMetrics:
    """All metric families, created once per registry (tests may pass their own)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        def c(name, doc, labels):
            return Counter(name, doc, labels, registry=registry)

        def g(name, doc, labels):
            return Gauge(name, doc, labels, registry=registry)

        def h(name, doc, labels, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.predictions = c(
            "tocoad_predictions_total", "Images scored, by label.", ["model", "version", "label"]
        )
        self.defect_rate = g("tocoad_defect_rate", "Share of defective images in the rolling window.",
                             ["model", "version"])  # fmt: skip
        self.score = h("tocoad_anomaly_score", "Normalised anomaly score (0.5 = threshold).", ["model", "version"],
                       SCORE_BUCKETS)  # fmt: skip
        self.statistic = h("tocoad_input_statistic", "Input image statistics.", ["model", "version", "stat"],
                           STAT_BUCKETS)  # fmt: skip
        self.errors = c(
            "tocoad_request_errors_total", "Rejected or failed requests, by kind.", ["model", "kind"]
        )
        self.latency = h("tocoad_request_seconds", "Request latency.", ["model", "protocol"], LATENCY_BUCKETS)
        self.batch = h("tocoad_batch_images", "Images per request.", ["model"], BATCH_BUCKETS)
        self.info = g("tocoad_model_info", "The served model version (value 1) and the alias it follows.",
                      ["model", "version", "uri", "follows"])  # fmt: skip
        self.reloads = c("tocoad_reloads_total", "Model reload attempts, by result.", ["model", "result"])
        self.loaded_at = g(
            "tocoad_last_reload_timestamp_seconds", "When the served version was loaded.", ["model"]
        )
        self.reload_age = g(
            "tocoad_reload_age_seconds", "Seconds since the served version was loaded.", ["model"]
        )
        self.psi = g("tocoad_drift_psi", "Population stability index, live vs training.",
                     ["model", "version", "feature"])  # fmt: skip
        self.ks = g(
            "tocoad_drift_ks", "KS statistic of normal-classed scores vs training.", ["model", "version"]
        )
        self.nn_exceed = g("tocoad_drift_nn_exceedance", "Share of live patches above the training p99 distance.",
                           ["model", "version"])  # fmt: skip
        self.window = g("tocoad_drift_window_images", "Images in the drift window.", ["model", "version"])


_DEFAULT: PredictorMetrics | None = None


def default_metrics() -> PredictorMetrics:
    """The process-wide metrics on prometheus_client's default registry (what KServe's /metrics serves)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PredictorMetrics()
    return _DEFAULT
