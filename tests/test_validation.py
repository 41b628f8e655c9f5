"""Dataset validation: the image profile table, the GX expectation suite and its human-readable verdict."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import ConfigError, TocoadConfig, ValidationSettings
from components.profile import quantiles
from flows.validation import COLUMNS, profile_images, statistic_bounds, validate_images

os.environ.setdefault("TOCOAD_PROGRESS", "0")
SIZE = 64


def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    """A varied, smooth colour texture with light pixel noise: every statistic well inside the defaults."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, size=(rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.uint8)
    field = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64
    )
    noisy = field + rng.normal(0, 3, field.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write(root: Path, name: str, img: np.ndarray) -> str:
    (root / name).write_bytes(_png(img))
    return name


def _clean_set(root: Path, n: int = 24) -> list[str]:
    return [_write(root, f"img_{i:03d}.png", _texture(i)) for i in range(n)]


def _failed(outcome) -> dict[str, object]:
    """Failing expectations keyed by column (or the expectation type for table-level ones)."""
    return {f.column or f.expectation: f for f in outcome.failures}


def test_clean_set_passes_with_a_complete_table(tmp_path):
    rels = _clean_set(tmp_path)
    outcome = validate_images(tmp_path, rels, ValidationSettings(), SIZE)
    assert outcome.success, outcome.message()
    assert outcome.failures == [] and outcome.result["success"] is True
    assert list(outcome.table.columns) == list(COLUMNS) and len(outcome.table) == 24
    row = outcome.table.iloc[0]
    assert row["layout"] == "64x64x3" and row["format"] == "PNG" and row["bit_depth"] == 8
    assert row["sha256"] == hashlib.sha256((tmp_path / rels[0]).read_bytes()).hexdigest()
    assert len(row["phash"]) == 16 and outcome.table["phash"].nunique() == 24
    assert not outcome.table[["is_near_duplicate", "is_exact_duplicate", "in_test_set"]].any().any()
    assert outcome.table["near_dup_group"].nunique() == 24
    json.dumps(outcome.result)  # JSON-able
    assert len(outcome.result["results"]) == 9
    assert "PASSED" in outcome.summary_markdown and "| `expect_column_values_to_be_unique` |" in (
        outcome.summary_markdown
    )
    assert "passed" in outcome.message()


def test_broken_set_fails_and_names_every_problem(tmp_path):
    rels = _clean_set(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(_png(_texture(100))[:300])
    (tmp_path / "dup.png").write_bytes((tmp_path / rels[3]).read_bytes())
    rels += ["corrupt.png", "dup.png", _write(tmp_path, "small.png", _texture(101, size=48))]
    rels.append(_write(tmp_path, "black.png", np.zeros((SIZE, SIZE, 3), np.uint8)))
    outcome = validate_images(tmp_path, rels, ValidationSettings(), SIZE)

    assert not outcome.success and outcome.result["success"] is False
    failed = _failed(outcome)
    assert set(failed) == {"decodable", "layout", "sha256", "brightness", "contrast", "sharpness"}
    assert failed["decodable"].examples == ["corrupt.png"] and "not decode" in failed["decodable"].problem
    assert failed["layout"].examples == ["small.png"] and "48x48x3" in failed["layout"].problem
    assert sorted(failed["sha256"].examples) == ["dup.png", rels[3]]
    assert failed["brightness"].examples == ["black.png"]
    assert failed["layout"].expectation == "expect_column_unique_value_count_to_be_between"

    message = outcome.message()
    for words in ("not decode", "exact duplicate", "layouts", "brightness", "contrast"):
        assert words in message
    for name in ("corrupt.png", "dup.png", "small.png", "black.png"):
        assert name in message
    table = outcome.table.set_index("path")
    assert not table.loc["corrupt.png", "decodable"] and "PNG" in table.loc["corrupt.png", "error"]
    assert np.isnan(table.loc["corrupt.png", "brightness"]) and pd.isna(table.loc["corrupt.png", "width"])
    assert table["is_exact_duplicate"].sum() == 1  # the later copy by path only
    assert "FAILED" in outcome.summary_markdown and "## Failures" in outcome.summary_markdown


def test_mixed_sizes_are_checked_against_side_bounds(tmp_path):
    rels = _clean_set(tmp_path, 20) + [_write(tmp_path, "small.png", _texture(200, size=48))]
    strict = validate_images(tmp_path, rels, ValidationSettings(allow_mixed_sizes=True), SIZE)
    assert set(_failed(strict)) == {"width", "height"} and _failed(strict)["width"].examples == ["small.png"]
    loose = ValidationSettings(allow_mixed_sizes=True, min_side=32)
    assert validate_images(tmp_path, rels, loose, SIZE).success


def test_too_few_images_fail_the_count(tmp_path):
    outcome = validate_images(tmp_path, _clean_set(tmp_path, 10), ValidationSettings(), SIZE)
    assert [f.expectation for f in outcome.failures] == ["expect_table_row_count_to_be_between"]
    assert "at least 20" in outcome.message()
    empty = validate_images(tmp_path, [], ValidationSettings(), SIZE)  # never crashes
    assert not empty.success and "expect_table_row_count_to_be_between" in empty.message()


def test_overlap_with_the_test_set_fails(tmp_path):
    rels = _clean_set(tmp_path)
    leaked = hashlib.sha256((tmp_path / rels[5]).read_bytes()).hexdigest()
    outcome = validate_images(tmp_path, rels, ValidationSettings(), SIZE, test_sha256={leaked, "0" * 64})
    assert set(_failed(outcome)) == {"in_test_set"}
    assert _failed(outcome)["in_test_set"].examples == [rels[5]] and rels[5] in outcome.message()


def test_near_duplicates_over_the_ratio_fail(tmp_path):
    rels = _clean_set(tmp_path)
    rng = np.random.default_rng(7)
    for i in range(5):
        img = np.asarray(Image.open(tmp_path / rels[i]), dtype=np.int16)
        noisy = np.clip(img + rng.integers(-1, 2, img.shape), 0, 255).astype(np.uint8)
        rels.append(_write(tmp_path, f"zz_copy_{i}.png", noisy))
    outcome = validate_images(tmp_path, rels, ValidationSettings(), SIZE)
    assert set(_failed(outcome)) == {"is_near_duplicate"}
    table = outcome.table.set_index("path")
    assert table["is_near_duplicate"].sum() == 5 and not table["is_exact_duplicate"].any()
    for i in range(5):
        assert table.loc[f"zz_copy_{i}.png", "near_dup_group"] == table.loc[rels[i], "near_dup_group"]
        assert (
            table.loc[f"zz_copy_{i}.png", "is_near_duplicate"] and not table.loc[rels[i], "is_near_duplicate"]
        )
    assert "near-duplicates" in outcome.message() and "zz_copy_0.png" in outcome.message()
    # the same 5 copies are within the allowed share of a larger set
    assert validate_images(tmp_path, rels, ValidationSettings(max_near_duplicate_ratio=0.2), SIZE).success


def test_profile_bounds_replace_the_absolute_defaults(tmp_path):
    rels = _clean_set(tmp_path)
    table = profile_images(tmp_path, rels, SIZE, near_duplicate_hamming=4)
    profile = {
        "image_stats": {name: quantiles(table[name].to_numpy()) for name in ("brightness", "contrast")}
    }
    settings = ValidationSettings()
    bounds = statistic_bounds(settings, profile)
    q = profile["image_stats"]["brightness"]
    span = max(0.5 * (q[-1] - q[0]), 0.25 * abs(q[10]))
    assert bounds["brightness"] == pytest.approx((q[0] - span, q[-1] + span))
    assert bounds["sharpness"] == settings.sharpness  # not in the profile: absolute default
    assert statistic_bounds(settings, None) == {
        "brightness": settings.brightness,
        "contrast": settings.contrast,
        "sharpness": settings.sharpness,
    }
    assert validate_images(tmp_path, rels, settings, SIZE, production_profile=profile).success

    bright = np.clip(_texture(300).astype(np.int16) + 60, 0, 255).astype(np.uint8)
    rels.append(_write(tmp_path, "bright.png", bright))
    assert validate_images(tmp_path, rels, settings, SIZE).success  # inside the absolute defaults
    outcome = validate_images(tmp_path, rels, settings, SIZE, production_profile=profile)
    assert set(_failed(outcome)) == {"brightness"} and _failed(outcome)["brightness"].examples == [
        "bright.png"
    ]
    assert "production profile" in outcome.summary_markdown


def test_validation_and_promotion_settings_are_documented_and_checked():
    cfg = TocoadConfig()
    assert cfg.validation.min_images == 20 and cfg.validation.brightness == (0.02, 0.98)
    assert cfg.promotion.metrics == ["image_auroc", "pixel_auroc", "aupro"] and cfg.promotion.require_metrics
    text = cfg.to_yaml(with_docs=True)
    assert "near_duplicate_hamming: 4  # " in text and "max_drop_points: 0.5  # " in text
    assert cfg.with_overrides(["validation.brightness=[0.1, 0.9]"]).validation.brightness == (0.1, 0.9)
    with pytest.raises(ConfigError, match="validation"):
        TocoadConfig.from_dict({"validation": {"contrast": [0.5, 0.1]}})
    with pytest.raises(ConfigError, match=r"validation\.stat_mostly"):
        TocoadConfig.from_dict({"validation": {"stat_mostly": 1.5}})


def _subset(folder: Path, n: int = 60) -> list[str]:
    names = sorted(p.name for p in folder.glob("*.png"))
    return names[:: max(1, len(names) // n)][:n]


@pytest.mark.realdata
@pytest.mark.parametrize("dataset", ["bottle_dir", "tire_dir"])
def test_real_train_sets_validate(dataset, request):
    good = request.getfixturevalue(dataset) / "train" / "good"
    rels = _subset(good)
    outcome = validate_images(good, rels, ValidationSettings(), image_size=256)
    assert outcome.success, outcome.message()
    assert len(outcome.table) == 60 and outcome.table["decodable"].all()
