"""Load a model bundle for serving: from ``s3://models/<name>/<version|alias>`` through the registry, or from a
local folder such as ``/mnt/models`` (KServe's storage initializer). Checksums are verified, and the model is
warmed up before it is handed over, so the server is never ready with a half-loaded model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.bundle import verify_bundle
from components.model import AnomalyModel
from components.pipeline import load_artifacts
from components.predict import prepare


@dataclass
class LoadedModel:
    """A served model version: the scorer plus what the metrics and responses need."""

    model: AnomalyModel
    name: str
    version: str
    uri: str
    profile: dict[str, Any]
    loaded_at: float = field(default_factory=time.time)
    timings: dict[str, float] = field(
        default_factory=dict
    )  # fetch (download + verify), load, warm-up seconds
    lock: Any = None  # set by the predictor: one batch at a time through one model's faiss index


def open_registry() -> Any:
    """The model registry on the configured S3 endpoint, or on a local server that runs already: the predictor
    never starts a storage server."""
    from storage.registry import ModelRegistry
    from storage.settings import resolve_settings
    from storage.store import ArtifactStore

    return ModelRegistry(ArtifactStore(resolve_settings(start_local=False), progress=False))


def _fetch(uri: str) -> tuple[Path, str]:
    """A verified local bundle folder and its version for ``uri``."""
    if uri.startswith("s3://"):
        from storage.registry import RegistryError, parse_s3_uri

        bucket, prefix = parse_s3_uri(uri)
        parts = prefix.split("/")
        if len(parts) != 2:
            raise RegistryError(
                f"{uri}: a model URI looks like s3://{bucket}/<name>/<version|production|candidate>"
            )
        registry = open_registry()
        if registry.bucket != bucket:
            raise RegistryError(f"{uri}: models live in bucket {registry.bucket!r} (TOCOAD_MODELS_BUCKET)")
        version = registry.resolve(parts[0], parts[1])
        return registry.pull(parts[0], version), version
    path = Path(uri.removeprefix("file://"))
    verify_bundle(path)
    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    return path, f"local-{digest[:12]}"  # a local bundle has no registry version: name it by its manifest


def load_model(uri: str, name: str) -> LoadedModel:
    """Fetch, verify, load and warm up the bundle at ``uri``."""
    t0 = time.perf_counter()
    folder, version = _fetch(uri)
    t1 = time.perf_counter()
    art = load_artifacts(folder, torch.device("cpu"))
    if art.calibration is None:
        raise ValueError(f"{uri} has no calibration (train it with the memory-bank stage)")
    model = art.model(torch.device("cpu"))
    t2 = time.perf_counter()
    model.predict(prepare([np.zeros((model.image_size, model.image_size, 3), np.uint8)], model.image_size))
    t3 = time.perf_counter()
    profile_path = folder / "profile.json"
    profile = json.loads(profile_path.read_text()) if profile_path.is_file() else {}
    timings = {"fetch_s": t1 - t0, "load_s": t2 - t1, "warmup_s": t3 - t2}
    return LoadedModel(model, name, version, uri, profile, timings=timings)
