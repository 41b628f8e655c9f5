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
