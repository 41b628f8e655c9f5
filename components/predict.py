"""Scoring image files with a bundle, as ``tocoad predict`` does (the predictor server shares ``score_images``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.calibration import Calibration
from components.images import load_image, resize_rgb, to_tensor
from components.model import AnomalyModel
from components.pipeline import load_artifacts
from components.report import overlay_heatmap


def prepare(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 RGB arrays of any size -> one [0, 1] batch at the model's square size."""
    return torch.stack([to_tensor(resize_rgb(img, (size, size))) for img in images])


def describe_scores(scores: np.ndarray, cal: Calibration | None) -> list[dict[str, Any]]:
    """Per raw image score: the score, and with a calibration its normalised value, threshold and label."""
    out = []
    for raw in scores:
        item: dict[str, Any] = {"score": float(raw)}
        if cal is not None:
            item["normalized"] = float(cal.normalize(float(raw)))
            item["threshold"] = float(cal.threshold)
            item["label"] = "defective" if raw >= cal.threshold else "normal"
        out.append(item)
    return out


def score_images(
    model: AnomalyModel, images: list[np.ndarray], with_maps: bool = False
) -> list[dict[str, Any]]:
    """Raw and normalised score, label and threshold for each uint8 RGB image (maps too if asked)."""
    pred = model.predict(prepare(images, model.image_size), with_maps=with_maps)
    out = describe_scores(pred.scores, model.calibration)
    if with_maps and pred.maps is not None:
        for item, amap in zip(out, pred.maps, strict=True):
            item["map"] = amap
    return out


def heatmap_paths(paths: list[Path], heatmap_dir: Path) -> list[Path]:
    """Where each image's heatmap goes: its folder below the images' common folder is kept, so names never collide.

    ``d/test/crack/000.png`` and ``d/test/scratch/000.png`` give ``DIR/crack/000_heatmap.png`` and
    ``DIR/scratch/000_heatmap.png``; a name that still repeats (``x.png`` and ``x.jpg``, or one file given twice)
    gets ``_2``, ``_3``, ... before ``.png``.
    """
    resolved = [Path(p).resolve() for p in paths]
    if not resolved:
        return []
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    targets: list[Path] = []
    for path in resolved:
        stem = Path(heatmap_dir) / path.parent.relative_to(root) / f"{path.stem}_heatmap"
        target, n = stem.with_name(stem.name + ".png"), 1
        while target in targets:
            n += 1
            target = stem.with_name(f"{stem.name}_{n}.png")
        targets.append(target)
    return targets


def predict_files(bundle: Path, paths: list[Path], heatmap_dir: Path | None = None) -> list[dict[str, Any]]:
    """Score image files; with ``heatmap_dir``, also save an overlay PNG of each anomaly map (see
    :func:`heatmap_paths` for the names)."""
    from PIL import Image

    art = load_artifacts(bundle)
    model = art.model()
    targets = heatmap_paths(paths, heatmap_dir) if heatmap_dir is not None else [None] * len(paths)
    results = []
    for path, out in zip(paths, targets, strict=True):
        img = load_image(path, max_pixels=art.cfg.data.max_image_pixels)
        item = score_images(model, [img], with_maps=heatmap_dir is not None)[0]
        item["path"] = str(path)
        amap = item.pop("map", None)
        if out is not None and amap is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            cal = model.calibration
            vmax = cal.pixel_max if cal is not None and cal.pixel_max else float(amap.max())
            small = resize_rgb(img, amap.shape)
            Image.fromarray(overlay_heatmap(small, amap, 0.0, vmax)).save(out)
            item["heatmap"] = str(out)
        results.append(item)
    return results
