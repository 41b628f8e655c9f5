"""Dataset validation before training: profile every image, then check the profile with great-expectations.

:func:`profile_images` turns a list of image files into a table (one row per file: hashes, header facts, size,
the image statistics a trained model's drift profile stores, duplicate flags). :func:`validate_images` runs a
great-expectations (GX 1.x) suite over that table in an ephemeral, in-memory GX context and returns a
:class:`ValidationOutcome`: pass/fail, the failing expectations in human words with example files, GX's own
JSON result and a Markdown report. The Prefect flow calls it as a task and raises ``outcome.message()``.

Decisions worth knowing:

* Decoding uses :mod:`components.images` (same limits and errors as training), so "decodes here" means "trains".
* Statistics (brightness, contrast, sharpness) are computed exactly as :func:`components.profile.image_statistics`
  on the image resized to ``image_size``: pass the production model's ``data.image_size`` so profile bounds apply.
* The perceptual hash is **relative to the image set**: 64 low-frequency DCT coefficients of a 32x32 grey
  thumbnail, each cut at a threshold chosen over the set (the widest gap between its 30th and 70th
  percentile), where classic pHash cuts at the image's own median. Industrial images come from one fixed
  camera and scene, so classic 64-bit pHash/dHash put nearly all of them within a few bits of each other
  (MVTec bottle: every image has a dHash "near-duplicate"). Per-coefficient thresholds make each bit split the
  set, so distinct captures differ in ~30 bits, and cutting in a gap keeps an image and its re-saved or lightly
  noised copies on the same side (0-3 bits apart). The hash is only comparable within one call. Sets of fewer
  than 8 hashable images use the classic per-image median.
* Expectations over statistics see undecodable images as missing values, which GX leaves out of the count
  (``mostly`` is a share of decodable images); the decode expectation reports those images instead.
* GX is imported lazily (it takes seconds), runs with analytics and progress bars off, and every call uses a
  fresh ephemeral context with unique names, so repeated calls in one process are independent.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.fft
from PIL import Image
from tqdm.auto import tqdm

from components.config import ValidationSettings
from components.images import FORMATS, ImageError, decode_image, read_bytes, resize_rgb, to_tensor
from components.profile import image_statistics

__all__ = [
    "COLUMNS",
    "STATISTICS",
    "Failure",
    "ValidationOutcome",
    "profile_images",
    "statistic_bounds",
    "validate_images",
]

STATISTICS = ("brightness", "contrast", "sharpness")
COLUMNS = (
    "path", "sha256", "phash", "decodable", "error", "format", "mode", "width", "height", "channels",
    "bit_depth", "layout", "brightness", "contrast", "sharpness", "near_dup_group", "is_near_duplicate",
    "in_test_set", "is_exact_duplicate",
)  # fmt: skip
_MAX_EXAMPLES = 5
_HASH_SIDE = 32
_MIN_SET_FOR_RELATIVE_HASH = 8
# the 64 lowest-frequency DCT coefficients after DC, in zigzag (u + v) order
_HASH_UV = tuple(
    np.array(axis)
    for axis in zip(
        *sorted(
            ((u, v) for u in range(_HASH_SIDE) for v in range(_HASH_SIDE) if u + v > 0),
            key=lambda uv: (uv[0] + uv[1], uv[0]),
        )[:64],
        strict=True,
    )
)
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class Failure:
    """One failed expectation in human words."""

    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_unique"
    column: str | None
    problem: str  # e.g. "3 images do not decode", "2 exact duplicates"
    examples: list[str] = field(default_factory=list)  # up to 5 relative file paths


@dataclass
class ValidationOutcome:
    """The verdict on an image set: GX's result, the failures, a Markdown report and the profile table."""

    success: bool
    failures: list[Failure]
    result: dict  # ExpectationSuiteValidationResult.to_json_dict()
    summary_markdown: str
    table: pd.DataFrame

    def message(self) -> str:
        """One paragraph naming each failing expectation and example files (the flow's error message)."""
        n = len(self.table)
        if self.success:
            return f"Dataset validation passed: {n} images met all expectations."
        parts = []
        for f in self.failures:
            where = f"{f.expectation}" + (f" on {f.column}" if f.column else "")
            text = f"{f.problem} [{where}]"
            if f.examples:
                text += f", e.g. {', '.join(f.examples)}"
            parts.append(text)
        return (
            f"Dataset validation failed ({len(self.failures)} expectation(s) unmet, {n} images): "
            + "; ".join(parts)
            + "."
        )


# ---------------------------------------------------------------- profiling


def _progress() -> bool:
    return os.environ.get("TOCOAD_PROGRESS", "1") != "0"


def _header(data: bytes) -> dict[str, Any]:
    """Format, mode, channels and bit depth from the header, without decoding the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
                fmt, mode, channels = im.format, im.mode, len(im.getbands())
                bits = None
                if fmt == "PNG" and data[12:16] == b"IHDR":
                    bits = int(data[24])  # IHDR bit depth per sample
                elif fmt == "TIFF":
                    tag = getattr(im, "tag_v2", {}).get(258)
                    tag = tag[0] if isinstance(tag, tuple) and tag else tag
                    bits = int(tag) if isinstance(tag, int) else None
                if bits is None:
                    bits = {"1": 1, "I": 32, "F": 32}.get(mode, 16 if mode.startswith("I;16") else 8)
    except Exception:  # an unreadable header: the decode step reports why
        return {}
    return {"format": fmt, "mode": mode, "channels": channels, "bit_depth": bits}


def _hash_coefficients(rgb: np.ndarray) -> np.ndarray:
    """The 64 low-frequency DCT coefficients (after DC) of the 32x32 grey thumbnail of uint8 RGB."""
    grey = Image.fromarray(np.ascontiguousarray(rgb.astype(np.float32) @ _GREY))
    thumb = np.asarray(grey.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BOX), dtype=np.float64)
    return scipy.fft.dctn(thumb, norm="ortho")[_HASH_UV]


def _perceptual_hashes(coefficients: np.ndarray) -> np.ndarray:
    """uint64 hashes of ``[N, 64]`` coefficients, each thresholded over the set (see the module notes)."""
    n = len(coefficients)
    if n >= _MIN_SET_FOR_RELATIVE_HASH:
        # per coefficient: cut in the widest gap between 30 % and 70 % of the sorted values, so a tight
        # cluster (an image and its near-copies) is never split by the threshold
        ordered = np.sort(coefficients, axis=0)
        low, high = max(1, int(0.3 * n)), min(n - 1, math.ceil(0.7 * n))
        gaps = ordered[low : high + 1] - ordered[low - 1 : high]
        cut = low + np.argmax(gaps, axis=0)
        columns = np.arange(coefficients.shape[1])
        reference = ((ordered[cut - 1, columns] + ordered[cut, columns]) / 2)[None, :]
    else:
        reference = np.median(coefficients, axis=1, keepdims=True)
    bits = np.packbits(coefficients > reference, axis=1)  # [N, 8] bytes, most significant bit first
    return np.ascontiguousarray(bits).view(">u8")[:, 0].astype(np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def _near_duplicate_groups(hashes: list[int | None], max_distance: int) -> list[int]:
    """Union-find over pairs within ``max_distance`` bits; group ids numbered in order of first member."""
    parent = list(range(len(hashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    valid = [i for i, h in enumerate(hashes) if h is not None]
    values = np.array([hashes[i] for i in valid], dtype=np.uint64)
    for a in range(len(valid) - 1):
        for b in np.nonzero(_popcount(values[a + 1 :] ^ values[a]) <= max_distance)[0]:
            ra, rb = find(valid[a]), find(valid[a + 1 + int(b)])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(len(hashes))]


def _profile_one(root: Path, rel: str, image_size: int) -> tuple[dict[str, Any], np.ndarray | None]:
    row: dict[str, Any] = {"path": rel, "decodable": False, "error": ""}
    try:
        data = read_bytes(root / rel)
    except ImageError as exc:
        row["error"] = str(exc)
        return row, None
    row["sha256"] = hashlib.sha256(data).hexdigest()
    row.update(_header(data))
    try:
        rgb = decode_image(data, source=rel)  # = components.images.load_image, reading the bytes once
    except ImageError as exc:
        row["error"] = str(exc)
        return row, None
    height, width = rgb.shape[:2]
    small = resize_rgb(rgb, (image_size, image_size))
    stats = image_statistics(to_tensor(small).unsqueeze(0))
    row.update(
        decodable=True,
        width=width,
        height=height,
        layout=f"{width}x{height}x{row.get('channels', 3)}",
        **{name: float(stats[name][0]) for name in STATISTICS},
    )
    return row, _hash_coefficients(small)


def _first_by_path(table: pd.DataFrame, key: pd.Series) -> pd.Series:
    """True for rows whose ``key`` (non-null) already appeared on a row with a smaller path."""
    ordered = table.sort_values("path", kind="stable").index
    repeat = key.loc[ordered].duplicated(keep="first") & key.loc[ordered].notna()
    return repeat.reindex(table.index).astype(bool)


def profile_images(
    root: Path, rel_paths: list[str], image_size: int, near_duplicate_hamming: int
) -> pd.DataFrame:
    """One row per file (in ``rel_paths`` order) with the columns in :data:`COLUMNS`.

    Undecodable files have ``decodable`` False, the reason in ``error``, null size/layout/phash and NaN
    statistics. ``in_test_set`` is False here; :func:`validate_images` fills it.
    """
    root = Path(root)
    rows, coefficients = [], []
    for rel in tqdm(rel_paths, desc="profiling", unit="img", disable=not _progress(), dynamic_ncols=True):
        row, coeff = _profile_one(root, str(rel), image_size)
        rows.append(row)
        coefficients.append(coeff)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["decodable"] = table["decodable"].astype(bool)
    table["error"] = table["error"].fillna("").astype(str)
    for name in ("width", "height", "channels", "bit_depth"):
        table[name] = table[name].astype("Int64")
    for name in STATISTICS:
        table[name] = table[name].astype(np.float64)
    hashable = [i for i, c in enumerate(coefficients) if c is not None]
    hashes: list[int | None] = [None] * len(rows)
    if hashable:
        values = _perceptual_hashes(np.stack([coefficients[i] for i in hashable]))
        for i, h in zip(hashable, values, strict=True):
            hashes[i] = int(h)
    table["phash"] = [None if h is None else f"{h:016x}" for h in hashes]
    table["near_dup_group"] = pd.Series(
        _near_duplicate_groups(hashes, near_duplicate_hamming), dtype=np.int64
    )
    group_size = table.groupby("near_dup_group")["path"].transform("size")
    table["is_near_duplicate"] = _first_by_path(table, table["near_dup_group"]) & (group_size > 1)
    table["in_test_set"] = False
    table["is_exact_duplicate"] = _first_by_path(table, table["sha256"])
    return table


# ---------------------------------------------------------------- bounds


def statistic_bounds(
    settings: ValidationSettings, production_profile: dict | None
) -> dict[str, tuple[float, float]]:
    """Allowed range of each statistic: from the production profile's quantiles widened by ``profile_margin``
    (at least ``profile_rel_margin`` of the median), else the absolute defaults in ``settings`` (also for a
    statistic the profile lacks)."""
    stats = (production_profile or {}).get("image_stats") or {}
    bounds: dict[str, tuple[float, float]] = {}
    for name in STATISTICS:
        quantiles = stats.get(name)
        if quantiles:
            low, high = float(min(quantiles)), float(max(quantiles))  # q0 and q100
            median = float(quantiles[len(quantiles) // 2])
            span = max(settings.profile_margin * (high - low), settings.profile_rel_margin * abs(median))
            bounds[name] = (low - span, high + span)
        else:
            low, high = getattr(settings, name)
            bounds[name] = (float(low), float(high))
    return bounds


# ---------------------------------------------------------------- validation


def _gx_context():
    """A fresh in-memory GX context with analytics and progress bars off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _suite(name: str, settings: ValidationSettings, bounds: dict[str, tuple[float, float]]):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=name)

    def add(check: str, expectation) -> None:
        expectation.meta = {"tocoad_check": check}
        suite.add_expectation(expectation)

    add("decode", gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]))
    add("count", gxe.ExpectTableRowCountToBeBetween(min_value=settings.min_images))
    if settings.allow_mixed_sizes:
        for side in ("width", "height"):
            add(side, gxe.ExpectColumnValuesToBeBetween(column=side, min_value=settings.min_side,
                                                        max_value=settings.max_side))  # fmt: skip
    else:
        add("layout", gxe.ExpectColumnUniqueValueCountToBeBetween(column="layout", min_value=1, max_value=1))
    add("exact", gxe.ExpectColumnValuesToBeUnique(column="sha256"))
    add(
        "near",
        gxe.ExpectColumnValuesToBeInSet(
            column="is_near_duplicate", value_set=[False], mostly=1.0 - settings.max_near_duplicate_ratio
        ),
    )
    for name in STATISTICS:
        low, high = bounds[name]
        add(
            name,
            gxe.ExpectColumnValuesToBeBetween(
                column=name, min_value=low, max_value=high, mostly=settings.stat_mostly
            ),
        )
    add("test", gxe.ExpectColumnValuesToBeInSet(column="in_test_set", value_set=[False]))
    return suite


def _unexpected_paths(result: dict) -> list[str]:
    return [str(row["path"]) for row in result.get("unexpected_index_list") or [] if "path" in row]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _describe(
    check: str, res: dict, kwargs: dict, table: pd.DataFrame, settings: ValidationSettings
) -> tuple[str, list[str]]:
    """The problem in words and example paths for one failed expectation."""
    result = res.get("result") or {}
    paths = _unexpected_paths(result)
    examples = paths[:_MAX_EXAMPLES]
    n_unexpected = int(result.get("unexpected_count") or len(paths))
    n_checked = int(result.get("element_count") or 0) - int(result.get("missing_count") or 0)
    if check == "decode":
        errors = table.loc[~table["decodable"], "error"]
        first = f" (first: {errors.iloc[0]})" if len(errors) else ""
        verb = "does" if n_unexpected == 1 else "do"
        return f"{_plural(n_unexpected, 'image')} {verb} not decode{first}", examples
    if check == "count":
        return f"only {_plural(len(table), 'image')}, at least {settings.min_images} needed", []
    if check == "layout":
        counts = Counter(table["layout"].dropna())
        listed = ", ".join(f"{k} ({_plural(v, 'image')})" for k, v in counts.most_common(5))
        main = counts.most_common(1)[0][0] if counts else None
        odd = table.loc[table["layout"].notna() & (table["layout"] != main), "path"].tolist()
        return f"{len(counts)} image layouts (WxHxC) where one is required: {listed}", odd[:_MAX_EXAMPLES]
    if check in ("width", "height"):
        return (
            f"{_plural(n_unexpected, 'image')} with {check} outside {settings.min_side}..{settings.max_side} px",
            examples,
        )
    if check == "exact":
        repeats = table.loc[table["is_exact_duplicate"]]
        firsts = table.loc[~table["is_exact_duplicate"]].drop_duplicates("sha256").set_index("sha256")["path"]
        pairs = [
            f"{p} = {firsts.get(s, '?')}" for p, s in zip(repeats["path"], repeats["sha256"], strict=True)
        ]
        shown = "; ".join(pairs[:3]) + ("; ..." if len(pairs) > 3 else "")
        return f"{_plural(len(repeats), 'exact duplicate')} (identical bytes: {shown})", examples
    if check == "near":
        return (
            f"{n_unexpected} of {_plural(n_checked, 'image')} ({n_unexpected / max(n_checked, 1):.0%}) are "
            f"near-duplicates of another (perceptual hash within {settings.near_duplicate_hamming} bits), "
            f"at most {settings.max_near_duplicate_ratio:.0%} allowed",
            examples,
        )
    if check in STATISTICS:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        values = ", ".join(
            f"{r['path']}: {r[check]:.3g}" for r in (result.get("unexpected_index_list") or [])[:3]
        )
        return (
            f"{n_unexpected} of {_plural(n_checked, 'decodable image')} have {check} outside "
            f"[{low:.3g}, {high:.3g}], at most {1 - settings.stat_mostly:.0%} may ({values})",
            examples,
        )
    if check == "test":
        verb = "is" if n_unexpected == 1 else "are"
        return f"{_plural(n_unexpected, 'image')} {verb} also in the test set (same bytes)", examples
    return f"expectation failed: {result}", examples


def _observed(res: dict) -> str:
    result = res.get("result") or {}
    if "observed_value" in result:
        return str(result["observed_value"])
    if "unexpected_count" in result:
        checked = int(result.get("element_count") or 0) - int(result.get("missing_count") or 0)
        missing = int(result.get("missing_count") or 0)
        text = f"{result['unexpected_count']} of {checked} unexpected"
        return text + (f" ({missing} missing)" if missing else "")
    return ""


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _summary(
    table: pd.DataFrame,
    rows: list[tuple[dict, list[str]]],
    failures: list[Failure],
    success: bool,
    bounds: dict[str, tuple[float, float]],
    bounds_source: str,
) -> str:
    n = len(table)
    layouts = Counter(table["layout"].dropna())
    top = ", ".join(f"{k} ({v})" for k, v in layouts.most_common(3)) or "none"
    lines = [
        f"# Dataset validation: {'PASSED' if success else 'FAILED'}",
        "",
        f"- images: {n}, decodable: {int(table['decodable'].sum())}",
        f"- layouts (WxHxC): {len(layouts)}: {top}",
        f"- exact duplicates: {int(table['is_exact_duplicate'].sum())}, "
        f"near-duplicates: {int(table['is_near_duplicate'].sum())}, "
        f"in the test set: {int(table['in_test_set'].sum())}",
        f"- statistic bounds ({bounds_source}): "
        + ", ".join(f"{k} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in bounds.items()),
        "",
        "| Expectation | Column | Result | Observed | Examples |",
        "|---|---|---|---|---|",
    ]
    for res, examples in rows:
        config = res.get("expectation_config") or {}
        kwargs = config.get("kwargs") or {}
        mostly = f" (mostly {kwargs['mostly']:.3g})" if "mostly" in kwargs else ""
        cells = [
            f"`{config.get('type', '?')}`{mostly}",
            kwargs.get("column") or "",
            "pass" if res.get("success") else "**FAIL**",
            _observed(res),
            ", ".join(f"`{p}`" for p in examples),
        ]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- **{f.problem}** (`{f.expectation}`" + (f" on `{f.column}`" if f.column else "") + ")"
                  + (": " + ", ".join(f"`{p}`" for p in f.examples) if f.examples else "")
                  for f in failures]  # fmt: skip
    return "\n".join(lines) + "\n"


def validate_images(
    root: Path,
    rel_paths: list[str],
    settings: ValidationSettings,
    image_size: int,
    production_profile: dict | None = None,
    test_sha256: set[str] = frozenset(),
) -> ValidationOutcome:
    """Profile ``rel_paths`` under ``root`` and check the profile with a GX expectation suite.

    ``image_size`` must be the model's ``data.image_size`` (statistics depend on it). ``production_profile``
    (a bundle's ``build_profile`` dict) tightens the statistic bounds; ``test_sha256`` holds the SHA-256 of
    the test images, none of which may be in the training set.
    """
    table = profile_images(root, rel_paths, image_size, settings.near_duplicate_hamming)
    test = {s.lower() for s in test_sha256}
    table["in_test_set"] = table["sha256"].isin(test).astype(bool)
    bounds = statistic_bounds(settings, production_profile)
    has_profile = bool((production_profile or {}).get("image_stats"))
    bounds_source = "production profile" if has_profile else "absolute defaults"

    tag = uuid.uuid4().hex[:12]
    context = _gx_context()
    source = context.data_sources.add_pandas(name=f"tocoad-images-{tag}")
    asset = source.add_dataframe_asset(name="images")
    batch_definition = asset.add_batch_definition_whole_dataframe(name="all")
    suite = context.suites.add(_suite(f"tocoad-dataset-{tag}", settings, bounds))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": table})
    validation = batch.validate(
        suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]}
    )
    result = validation.to_json_dict()

    failures: list[Failure] = []
    rows: list[tuple[dict, list[str]]] = []
    for res in result.get("results", []):
        config = res.get("expectation_config") or {}
        kwargs = config.get("kwargs") or {}
        check = (config.get("meta") or {}).get("tocoad_check", "")
        exception = res.get("exception_info") or {}
        if exception.get("raised_exception"):
            problem, examples = f"could not be evaluated: {exception.get('exception_message')}", []
        elif res.get("success"):
            rows.append((res, []))
            continue
        else:
            problem, examples = _describe(check, res, kwargs, table, settings)
        rows.append((res, examples))
        failures.append(Failure(config.get("type", "?"), kwargs.get("column"), problem, examples))
    success = bool(result.get("success")) and not failures
    summary = _summary(table, rows, failures, success, bounds, bounds_source)
    return ValidationOutcome(success, failures, result, summary, table)
