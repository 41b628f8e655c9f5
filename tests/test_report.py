"""The evaluation report on tiny synthetic arrays."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from components.report import overlay_heatmap, write_report


def _data(n: int = 8, size: int = 32, with_masks: bool = True):
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * (n // 2))
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[labels == 1, 8:16, 10:20] = 1
    maps = rng.random((n, size, size)).astype(np.float32) + masks
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    types = ["good" if y == 0 else ("crack" if i % 4 == 1 else "scratch") for i, y in enumerate(labels)]
    return dict(
        image_labels=labels,
        image_scores=maps.max(axis=(1, 2)) + rng.normal(0, 0.3, n),
        paths=[f"test/{t}/{i:03d}.png" for i, t in enumerate(types)],
        defect_types=types,
        images=images,
        maps=maps,
        masks=masks if with_masks else None,
    )


def _check_links(index: Path) -> list[str]:
    links = re.findall(r'src="([^"]+)"', index.read_text())
    assert links
    for link in links:
        assert not link.startswith(("/", "http")) and (index.parent / link).is_file(), link
    return links


def test_write_report(tmp_path: Path):
    index = write_report(
        tmp_path / "report",
        **_data(),
        threshold=1.2,
        metrics={"tocoad": {"image_auroc": 90.0}, "threshold": None},
        title="bottle <test>",
        n_examples=2,
        max_curve_pixels=2048,  # forces the strided pixel subsample
    )
    assert index.name == "index.html" and "bottle &lt;test&gt;" in index.read_text()
    links = _check_links(index)
    expected = {"roc_image.png", "roc_pixel.png", "pro_curve.png", "score_hist.png", "examples_worst.png"}
    assert expected <= set(links)
    report = json.loads((index.parent / "report.json").read_text())
    assert report["metrics"] == {"tocoad": {"image_auroc": 90.0}, "threshold": None}  # verbatim
    assert "tocoad.image_auroc" in index.read_text()
    areas = report["curve_metrics"]
    assert areas["pixel_stride"] == 2 and 0.0 <= areas["aupro"] <= 1.0 and areas["pixel_auroc"] > 0.5
    assert 0.5 < areas["image_auroc"] <= 1.0
    assert report["n_images"] == 8 and len(report["images"]) == 8
    assert set(report["per_defect_type"]) == {"good", "crack", "scratch"}


def test_report_normal_only_without_masks(tmp_path: Path):
    data = _data(with_masks=False)
    data["image_labels"] = np.zeros(8, int)
    index = write_report(tmp_path, **data, threshold=1.0, metrics={}, title="t", n_examples=1)
    links = _check_links(index)
    assert "pro_curve.png" not in links and "roc_image.png" not in links
    assert json.loads((tmp_path / "report.json").read_text())["curve_metrics"] == {}


def test_report_rejects_mismatched_lengths(tmp_path: Path):
    data = _data()
    data["paths"] = data["paths"][:-1]
    with pytest.raises(ValueError, match="paths"):
        write_report(tmp_path, **data, threshold=1.0, metrics={}, title="t")


def test_overlay_heatmap():
    image = np.full((20, 30, 3), 128, np.uint8)
    amap = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    out = overlay_heatmap(image, amap, 0.0, 1.0)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[-1, -1])  # low vs high end of the colormap
    small = overlay_heatmap(image[..., 0], amap[::2, ::3], 0.0, 1.0)  # grey image, resized map
    assert small.shape == (20, 30, 3)
    assert overlay_heatmap(image, amap, 1.0, 1.0).dtype == np.uint8  # degenerate range
