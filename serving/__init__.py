"""The KServe predictor: scores images over HTTP (V1 and V2 protocols), reloads models hot, and exports
defect-rate, latency, error and drift metrics to Prometheus. Uses ``components`` and ``storage``."""
