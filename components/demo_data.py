"""A small, realistic demo dataset that needs no download, in the MVTec AD layout with exact masks.

Normal images are random crops of a real texture photograph bundled with scikit-image (``brick``, ``grass``
or ``gravel``; CC0, from cc0textures.com / DeviantArt), tinted to colour, with brightness jitter and mild
sensor noise. Defective images add one of three defects, each with its pixel-exact mask:

* ``scratch``: a thin curved line, lighter or darker than the surface;
* ``spot``: an irregular stain of another colour that keeps the texture underneath;
* ``hole``: an irregular dark region.

Defects are blended (not pasted), so they are visible but do not saturate. Every image has its own RNG seeded
from ``(seed, texture, split, index)``: output is deterministic and image *k* does not depend on the counts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEFECT_TYPES", "DEMO_IMAGE_SIZE", "TEXTURES", "make_demo_dataset"]

GENERATOR = "components.demo_data"
DEFECT_TYPES = ("scratch", "spot", "hole")
# texture -> (skimage.data function, dark tint, light tint, credit)
TEXTURES: dict[str, tuple[str, tuple[float, ...], tuple[float, ...], str]] = {
    "brick": ("brick", (0.16, 0.07, 0.05), (0.92, 0.60, 0.48), "cc0textures.com Bricks25, CC0"),
    "grass": ("grass", (0.04, 0.14, 0.03), (0.62, 0.86, 0.36), "DeviantArt linolafett Grass-01, CC0"),
    "gravel": ("gravel", (0.14, 0.13, 0.12), (0.86, 0.82, 0.74), "cc0textures.com Gravel04, CC0"),
}
_STAINS = ((0.20, 0.30, 0.65), (0.85, 0.72, 0.15), (0.15, 0.45, 0.20), (0.55, 0.20, 0.55))
_SPLITS = {"train": 0, "test_good": 1, "test_defect": 2}
# The demo trains at the size it draws its images. At 128 px a defect (a hole is 9-19 px across) covers about one
# patch of the stride-8 feature map: the model found 25-29 % of the defects at its threshold (image AUROC 77-92,
# data seeds 0-2). At 256 px it found 96-100 % with at most 1 false alarm among 24 good images (AUROC 98.3-100,
# data seeds 0-4); the threshold (the largest out-of-fold training score) was right at 128 px too.
DEMO_IMAGE_SIZE = 256


def _texture(name: str) -> np.ndarray:
    """The grey texture photograph as float32 [H, W] in [0, 1] (bundled with scikit-image, no download)."""
    from skimage import data

    return np.asarray(getattr(data, TEXTURES[name][0])(), dtype=np.float32) / 255.0


def _normal_image(tex: np.ndarray, name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop, resized to ``size``, tinted, with brightness jitter: float32 [size, size, 3]."""
    crop = min(min(tex.shape), round(size * 1.7 * rng.uniform(0.95, 1.05)))
    y = int(rng.integers(0, tex.shape[0] - crop + 1))
    x = int(rng.integers(0, tex.shape[1] - crop + 1))
    patch = Image.fromarray(tex[y : y + crop, x : x + crop]).resize((size, size), Image.Resampling.BILINEAR)
    grey = np.clip(np.asarray(patch) * rng.uniform(0.92, 1.08) + rng.uniform(-0.02, 0.02), 0, 1)
    lo, hi = (np.asarray(c, dtype=np.float32) for c in TEXTURES[name][1:3])
    return (lo + grey[..., None] * (hi - lo)).astype(np.float32)


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = img + rng.normal(0.0, 0.008, img.shape)
    return np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _blob(size: int, rng: np.random.Generator, radius: float) -> np.ndarray:
    """An irregular filled blob (a circle with a wavy rim) away from the border."""
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    yy, xx = _grid(size)
    theta = np.arctan2(yy - cy, xx - cx)
    rim = np.ones_like(theta)
    for k in (2, 3, 5):
        rim += rng.uniform(0.04, 0.14) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.6, 1.0)
    dist = np.hypot((yy - cy) / aspect, xx - cx)
    return dist <= radius * rim


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    length = rng.uniform(0.25, 0.5) * size
    angle = rng.uniform(0, np.pi)
    start = rng.uniform(0.2, 0.8, 2) * size
    end = np.clip(start + length * np.array([np.sin(angle), np.cos(angle)]), 2, size - 3)
    bend = (rng.uniform(-0.3, 0.3) * length) * np.array([np.cos(angle), -np.sin(angle)])
    t = np.linspace(0, 1, int(8 * length) + 2)[:, None]
    ctrl = (start + end) / 2 + bend
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t**2 * end  # quadratic Bezier, [N, (y, x)]
    half = rng.uniform(0.5, 1.0) * max(1.0, size / 128)
    yy, xx = _grid(size)
    mask = np.zeros((size, size), dtype=bool)
    for py, px in curve:
        y0, y1 = int(max(0, py - half - 1)), int(min(size, py + half + 2))
        x0, x1 = int(max(0, px - half - 1)), int(min(size, px + half + 2))
        near = (yy[y0:y1, x0:x1] - py) ** 2 + (xx[y0:y1, x0:x1] - px) ** 2 <= max(half, 0.5) ** 2
        mask[y0:y1, x0:x1] |= near
    target = rng.choice([0.92, 0.06])
    alpha = rng.uniform(0.45, 0.65)
    out = img.copy()
    out[mask] = out[mask] * (1 - alpha) + target * alpha
    return out, mask


def _spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = _blob(size, rng, rng.uniform(0.045, 0.1) * size)
    colour = np.asarray(_STAINS[int(rng.integers(len(_STAINS)))], dtype=np.float32)
    lum = img.mean(axis=2, keepdims=True)
    stained = colour * (0.5 + lum)  # keeps the texture under the stain
    alpha = rng.uniform(0.4, 0.6)
    out = img.copy()
    out[mask] = (img * (1 - alpha) + stained * alpha)[mask]
    return out, mask


def _hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = _blob(size, rng, rng.uniform(0.035, 0.075) * size)
    out = img.copy()
    out[mask] *= rng.uniform(0.35, 0.5)
    return out, mask


_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "spot": _spot,
    "hole": _hole,
}


def _defect_image(base: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    min_area = max(6, base.shape[0] // 8)
    for _ in range(20):
        out, mask = _DEFECTS[kind](base, rng)
        if mask.sum() >= min_area:
            return out, mask
    raise RuntimeError(f"could not place a {kind} defect of at least {min_area} px")  # pragma: no cover


def _prepare(out_dir: Path) -> None:
    """Allow an empty or missing folder, or a previous demo (which is replaced); refuse anything else."""
    if out_dir.exists() and any(out_dir.iterdir()):
        source = out_dir / "SOURCE.json"
        try:
            ours = json.loads(source.read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(
                f"{out_dir} exists and is not an earlier demo dataset; choose an empty folder"
            )
        for name in ("train", "test", "ground_truth"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _write_notes(out_dir: Path, meta: dict) -> None:
    (out_dir / "SOURCE.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out_dir / "readme.txt").write_text(
        "Synthetic demo dataset made by tocoad (components/demo_data.py); not real inspection data.\n"
        f"Normal images are crops of the '{meta['texture']}' photograph bundled with scikit-image "
        f"(skimage.data.{TEXTURES[meta['texture']][0]}; {meta['texture_credit']}).\n"
        "Defects (scratch, spot, hole) are drawn on top; ground_truth masks are exact (0/255).\n"
        "Regenerate with: make_demo_dataset(out_dir, texture=..., seed=...).\n"
    )


def make_demo_dataset(
    out_dir: Path,
    *,
    texture: str = "brick",
    n_train: int = 60,
    n_test_good: int = 24,
    n_test_defect: int = 24,
    image_size: int = DEMO_IMAGE_SIZE,
    seed: int = 0,
) -> Path:
    """Write a demo dataset (MVTec layout) to ``out_dir`` and return ``out_dir``.

    Defect types cycle through :data:`DEFECT_TYPES`. An existing earlier demo in ``out_dir`` is replaced;
    any other non-empty folder raises ``FileExistsError``.
    """
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; choose one of {', '.join(TEXTURES)}")
    if image_size < 32 or min(n_train, n_test_good, n_test_defect) < 0 or n_train < 1:
        raise ValueError("need image_size >= 32, n_train >= 1 and non-negative test counts")
    out_dir = Path(out_dir)
    _prepare(out_dir)
    tex = _texture(texture)
    tex_id = list(TEXTURES).index(texture)

    def rng(split: str, i: int) -> np.random.Generator:
        return np.random.default_rng([seed, tex_id, _SPLITS[split], i])

    for i in range(n_train):
        r = rng("train", i)
        _save(
            _finish(_normal_image(tex, texture, image_size, r), r),
            out_dir / "train" / "good" / f"{i:03d}.png",
        )
    for i in range(n_test_good):
        r = rng("test_good", i)
        _save(
            _finish(_normal_image(tex, texture, image_size, r), r), out_dir / "test" / "good" / f"{i:03d}.png"
        )
    counts = dict.fromkeys(DEFECT_TYPES, 0)
    for i in range(n_test_defect):
        r = rng("test_defect", i)
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        stem = f"{counts[kind]:03d}"
        counts[kind] += 1
        img, mask = _defect_image(_normal_image(tex, texture, image_size, r), kind, r)
        _save(_finish(img, r), out_dir / "test" / kind / f"{stem}.png")
        _save(mask.astype(np.uint8) * 255, out_dir / "ground_truth" / kind / f"{stem}_mask.png")
    _write_notes(
        out_dir,
        {
            "generator": GENERATOR,
            "synthetic": True,
            "texture": texture,
            "texture_source": f"skimage.data.{TEXTURES[texture][0]}",
            "texture_credit": TEXTURES[texture][3],
            "seed": seed,
            "image_size": image_size,
            "counts": {"train_good": n_train, "test_good": n_test_good, **counts},
            "layout": "mvtec",
        },
    )
    return out_dir
