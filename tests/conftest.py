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
