"""End to end on real MVTec images (../shared/data): short training, real metrics, sensible threshold."""

import pytest

from components.config import TocoadConfig
from components.evaluate import evaluate
from components.pipeline import train

pytestmark = pytest.mark.realdata

QUICK = [
    "data.image_size=128",
    "generator.max_scale=5",
    "stage_d.epochs=1",
    "contrastive.epochs=1",
    "runtime.num_workers=0",
    "runtime.progress=false",
]


@pytest.mark.parametrize(
    ("dataset", "extra", "min_image", "min_pixel"),
    [  # bottle: every stage switched on; tire: the default (frozen F)
        ("bottle_dir", ["stage_d.enabled=true", "contrastive.enabled=true"], 95.0, 93.0),
        ("tire_dir", [], 60.0, 85.0),
    ],
)
def test_train_and_evaluate_on_real_images(request, tmp_path, dataset, extra, min_image, min_pixel):
    data = request.getfixturevalue(dataset)
    cfg = TocoadConfig().with_overrides(QUICK + extra)
    art = train(cfg, data, tmp_path / "bundle")
    metrics = evaluate(tmp_path / "bundle", data, tmp_path / "report", progress=False)
    m = metrics["tocoad"]
    assert m["image_auroc"] >= min_image and m["pixel_auroc"] >= min_pixel, m
    assert 0 < m["aupro"] <= 100
    # The threshold comes from normal images only, yet must not flag every good test image.
    assert m["false_positive_rate_at_threshold"] < 50.0, m
    assert art.calibration.threshold > 0
    assert (tmp_path / "report" / "index.html").is_file()
