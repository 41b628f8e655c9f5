"""Shared fixtures: the real-data location and CPU thread limits for a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TOCOAD_SHARED_DATA", REPO.parent / "shared" / "data"))

# One thread: tiny tensors gain nothing from two, and OpenMP spin-waits collapse under a shared CPU.
torch.set_num_threads(1)


def _require(path: Path) -> Path:
    """Return ``path`` if it exists; skip the test (or fail under CI=true) otherwise."""
    if path.exists():
        return path
    reason = (
        f"real data not found at {path}: set TOCOAD_SHARED_DATA to the folder that holds "
        "mvtec_ad/ and mvtec_3d_rgb/"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    """MVTec AD bottle at 256 px from ../shared/data."""
    return _require(SHARED_DATA / "mvtec_ad" / "bottle")


@pytest.fixture(scope="session")
def tire_dir() -> Path:
    """MVTec 3D-AD tire (RGB) at 256 px from ../shared/data."""
    return _require(SHARED_DATA / "mvtec_3d_rgb" / "tire")


_S3_ENV = ("TOCOAD_S3_ENDPOINT", "S3_ENDPOINT", "AWS_ENDPOINT_URL", "TOCOAD_S3_ACCESS_KEY", "TOCOAD_S3_SECRET_KEY",
           "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TOCOAD_S3_ROLE", "TOCOAD_MODELS_BUCKET",
           "TOCOAD_DATASETS_BUCKET")  # fmt: skip


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real local S3 server (SeaweedFS ``weed mini``) in a private TOCOAD_HOME, for the whole session.

    Yields the :class:`storage.local_server.LocalS3`; commands in the tests find it through ``TOCOAD_HOME``.
    """
    from storage.local_server import LocalS3

    saved = {k: os.environ.pop(k) for k in _S3_ENV if k in os.environ}
    home = tmp_path_factory.mktemp("tocoad-home")
    old_home = os.environ.get("TOCOAD_HOME")
    os.environ.update(TOCOAD_HOME=str(home), TOCOAD_PROGRESS="0", TOCOAD_S3_RETRIES="3")
    server = LocalS3(home / "s3")
    server.up()
    try:
        yield server
    finally:
        server.down()
        os.environ.update(saved)
        if old_home is None:
            os.environ.pop("TOCOAD_HOME", None)
        else:
            os.environ["TOCOAD_HOME"] = old_home


# ---------------------------------------------------------------- serving
TINY = [  # tiny images, epochs and heads: a whole training in seconds, every stage switched on
    "data.image_size=64",
    "stage_d.enabled=true",
    "contrastive.enabled=true",
    "generator.max_scale=3",
    "stage_d.epochs=1",
    "stage_d.width=16",
    "contrastive.epochs=1",
    "contrastive.proj_dim=32",
    "contrastive.pred_dim=8",
    "runtime.num_workers=0",
    "runtime.progress=false",
]


@pytest.fixture(scope="session")
def serve_data(tmp_path_factory):
    """A small demo data set (64 px) for the serving tests."""
    from components.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("serve") / "data", n_train=30, n_test_good=12,
                             n_test_defect=12, image_size=64)  # fmt: skip


@pytest.fixture(scope="session")
def serve_bundles(serve_data, tmp_path_factory):
    """Two tiny trained bundles (different seeds, so different versions) and a corrupt copy of the first."""
    import shutil

    from components.config import TocoadConfig
    from components.pipeline import train

    root = tmp_path_factory.mktemp("bundles")
    out = []
    for seed in (0, 1):
        cfg = TocoadConfig().with_overrides([*TINY, f"runtime.seed={seed}"])
        train(cfg, serve_data, root / f"b{seed}")
        out.append(root / f"b{seed}")
    corrupt = root / "corrupt"
    shutil.copytree(out[0], corrupt)
    (corrupt / "index.faiss").write_bytes(b"tampered")
    return out[0], out[1], corrupt


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Predictor:
    """A real ``tocoad serve`` subprocess on a loopback port."""

    def __init__(self, source, env: dict[str, str] | None = None, log_dir: Path | None = None):
        """Serve ``source``: a local bundle folder, or an ``s3://`` URI (through the registry)."""
        import subprocess
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        what = ["--storage-uri", source] if str(source).startswith("s3://") else ["--bundle", str(source)]
        self.log = open(Path(log_dir or Path(source).parent) / f"serve-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tocoad.cli", "serve", *what, "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout: float = 180) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tocoad serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/v2/models/tocoad/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"tocoad serve not ready after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log.close()


def b64_png(image) -> str:
    """A uint8 RGB array as base64 PNG."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="session")
def live_predictor(serve_bundles, serve_data):
    """A running predictor that has served normal and defective images; yields its base URL."""
    import httpx
    import numpy as np
    from PIL import Image

    server = Predictor(serve_bundles[0], env={"TOCOAD_SERVE_DRIFT_MIN_IMAGES": "5"})
    try:
        paths = sorted((serve_data / "test").rglob("*.png"))
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        body = {"instances": [{"image": {"b64": b64_png(im)}} for im in images]}
        httpx.post(f"{server.url}/v1/models/tocoad:predict", json=body, timeout=60).raise_for_status()
        yield server.url
    finally:
        server.stop()
