"""Dataset layouts (MVTec AD, VisA, BTAD, plain folder), a training-data fingerprint and a torch Dataset.

Layouts (``discover(root, layout)``):

* ``mvtec``: ``train/good/``, optional ``validation/good/``, ``test/<type>/`` (``good`` = normal) and
  ``ground_truth/<type>/<stem>_mask.png`` (``<stem>.png`` is accepted too).
* ``visa``: one VisA category folder, ``Data/Images/{Normal,Anomaly}/`` and ``Data/Masks/Anomaly/<stem>.png``.
  When the official split ``split_csv/1cls.csv`` sits in the VisA root (the category's parent) or in the
  category folder, its rows for this category (``object`` = folder name) give the split. Without it, every
  Normal image is for training and every Anomaly image is for testing: the test set then has no normal
  images, so image-level AUROC needs a holdout (see :func:`split_holdout`).
* ``btad``: ``train/ok/``, ``test/ok/``, ``test/ko/`` and ``ground_truth/ko/<stem>.png|bmp``.
* ``folder``: every image below ``root`` (recursive) is a normal training image; no test split.

``auto`` picks the first that matches; it picks ``folder`` only when no sub-folder name suggests labelled
defects (``test``, ``ko``, ``anomaly``, ``ground_truth``, ...), so defects are never trained as normal by
accident. Hidden files and folders (``.*``, e.g. macOS ``._x.png``) are ignored. All lists are sorted by path.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from components.images import (
    ImageError,
    decode_mask,
    load_image,
    read_bytes,
    resize_mask,
    resize_rgb,
    to_tensor,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "DatasetError",
    "DatasetSplits",
    "ImageDataset",
    "Sample",
    "detect_layout",
    "discover",
    "fingerprint",
    "list_images",
    "split_holdout",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
LAYOUTS = ("mvtec", "visa", "btad", "folder")
_EXPECTED = {
    "mvtec": "train/good/, test/<type>/, ground_truth/<type>/<stem>_mask.png",
    "visa": "Data/Images/Normal/, Data/Images/Anomaly/, Data/Masks/Anomaly/ (split from ../split_csv/1cls.csv)",
    "btad": "train/ok/, test/ok/, test/ko/, ground_truth/ko/",
    "folder": "any tree of normal images",
}
_MASK_DIR_NAMES = {"ground_truth", "gt", "mask", "masks"}  # MVTec and BTAD ground_truth/, VisA Masks/
_DEFECT_DIR_NAMES = _MASK_DIR_NAMES | {
    "test", "anomaly", "anomalies", "abnormal", "defect", "defects", "defective", "bad", "ko", "ng", "nok",
}  # fmt: skip


def is_mask(rel: str | Path) -> bool:
    """Whether a file of a dataset folder (path relative to its root) is a defect mask, not an image: it lies
    below a ``ground_truth``, ``gt``, ``mask`` or ``masks`` folder (any case)."""
    return any(part.lower() in _MASK_DIR_NAMES for part in Path(rel).parts[:-1])


class DatasetError(ValueError):
    """A dataset folder that does not match its layout; the message says what was expected."""


@dataclass(frozen=True)
class Sample:
    """One image: ``label`` 0 normal / 1 defective; ``defect_type`` is ``"good"`` for normal images."""

    path: Path
    label: int
    mask_path: Path | None
    defect_type: str


@dataclass
class DatasetSplits:
    """The samples of one dataset folder, by split."""

    root: Path
    layout: str
    train: list[Sample]
    test: list[Sample]
    validation: list[Sample] = field(default_factory=list)

    def summary(self) -> str:
        """One line: layout, root and counts per split."""
        bad = sum(s.label for s in self.test)
        val = f", validation {len(self.validation)}" if self.validation else ""
        return (
            f"{self.layout} dataset at {self.root}: train {len(self.train)}{val}, "
            f"test {len(self.test) - bad} good / {bad} defective"
        )


def _sort(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: s.path.as_posix())


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (hidden files and folders skipped), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if not recursive:
        return sorted((p for p in folder.iterdir() if _is_image(p)), key=Path.as_posix)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if _is_image(Path(dirpath, f))]
    return sorted(found, key=Path.as_posix)


def _normal(paths: list[Path]) -> list[Sample]:
    return [Sample(p, 0, None, "good") for p in paths]


def _mask_index(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in list_images(folder)}


def _find_mask(index: dict[str, Path], stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            if (hit := index.get(f"{name}{ext}".lower())) is not None:
                return hit
    return None


def _defective(paths: list[Path], mask_dir: Path, defect_type: str, missing: list[str]) -> list[Sample]:
    index = _mask_index(mask_dir)
    out = []
    for p in paths:
        mask = _find_mask(index, p.stem)
        if mask is None:
            missing.append(f"{p} (expected {mask_dir / (p.stem + '_mask.png')} or {p.stem}.png)")
        out.append(Sample(p, 1, mask, defect_type))
    return out


def _raise_missing(missing: list[str]) -> None:
    if missing:
        shown = "\n  ".join(missing[:5]) + (
            f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DatasetError(
            f"{len(missing)} defective test image(s) have no mask:\n  {shown}\n"
            "add the masks, or move those images out of the test set"
        )


def _read_mvtec(root: Path) -> DatasetSplits:
    test, missing = [], []
    test_dir = root / "test"
    for type_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []:
        if type_dir.name.startswith("."):
            continue
        images = list_images(type_dir)
        if type_dir.name == "good":
            test += _normal(images)
        else:
            test += _defective(images, root / "ground_truth" / type_dir.name, type_dir.name, missing)
    _raise_missing(missing)
    train = _normal(list_images(root / "train" / "good"))
    validation = _normal(list_images(root / "validation" / "good"))
    return DatasetSplits(root, "mvtec", train, _sort(test), validation)


def _read_btad(root: Path) -> DatasetSplits:
    missing: list[str] = []
    test = _normal(list_images(root / "test" / "ok"))
    test += _defective(list_images(root / "test" / "ko"), root / "ground_truth" / "ko", "ko", missing)
    _raise_missing(missing)
    return DatasetSplits(root, "btad", _normal(list_images(root / "train" / "ok")), _sort(test))


def _visa_csv(root: Path) -> Path | None:
    for base in (root.parent, root):
        if (path := base / "split_csv" / "1cls.csv").is_file():
            return path
    return None


def _read_visa_csv(root: Path, split_csv: Path) -> DatasetSplits:
    base = split_csv.parent.parent
    with split_csv.open(newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.DictReader(f) if (r.get("object") or "").strip() == root.name]
    if not rows:
        raise DatasetError(
            f"{split_csv} has no rows with object={root.name!r}; the category folder must keep its VisA "
            "name (e.g. candle, pcb1)"
        )
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    problems = []
    for r in rows:
        image = base / r["image"].strip()
        anomalous = r["label"].strip().lower() == "anomaly"
        mask = base / r["mask"].strip() if (r.get("mask") or "").strip() else None
        if not image.is_file():
            problems.append(f"{image} (listed in {split_csv.name}) does not exist")
        if anomalous and (mask is None or not mask.is_file()):
            problems.append(f"{image}: mask {mask or '(none listed)'} does not exist")
        split = r["split"].strip().lower()
        if split not in splits:
            raise DatasetError(
                f"{split_csv}: unknown split {r['split']!r} for {image}; expected train or test"
            )
        sample = Sample(
            image, int(anomalous), mask if anomalous else None, "anomaly" if anomalous else "good"
        )
        splits[split].append(sample)
    if problems:
        raise DatasetError(f"{split_csv}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:5]))
    return DatasetSplits(root, "visa", _sort(splits["train"]), _sort(splits["test"]))


def _read_visa(root: Path) -> DatasetSplits:
    if (split_csv := _visa_csv(root)) is not None:
        return _read_visa_csv(root, split_csv)
    missing: list[str] = []
    images = root / "Data" / "Images"
    test = _defective(
        list_images(images / "Anomaly"), root / "Data" / "Masks" / "Anomaly", "anomaly", missing
    )
    _raise_missing(missing)
    return DatasetSplits(root, "visa", _normal(list_images(images / "Normal")), test)


def _read_folder(root: Path) -> DatasetSplits:
    return DatasetSplits(root, "folder", _normal(list_images(root, recursive=True)), [])


_READERS: dict[str, Callable[[Path], DatasetSplits]] = {
    "mvtec": _read_mvtec,
    "visa": _read_visa,
    "btad": _read_btad,
    "folder": _read_folder,
}


def _defect_like_dirs(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.relpath(os.path.join(dirpath, d), root)
            for d in dirnames
            if d.lower() in _DEFECT_DIR_NAMES
        ]
    return sorted(found)


def _unknown(root: Path, why: str) -> DatasetError:
    expected = "\n  ".join(f"{name}: {folders}" for name, folders in _EXPECTED.items())
    return DatasetError(f"{root}: {why}. Supported layouts and the folders they expect:\n  {expected}")


def detect_layout(root: Path) -> str:
    """Name the layout of ``root`` (see module docs), or raise :class:`DatasetError` saying why not."""
    root = Path(root)
    if (root / "train" / "good").is_dir():
        return "mvtec"
    if (root / "train" / "ok").is_dir():
        return "btad"
    if (root / "Data" / "Images" / "Normal").is_dir():
        return "visa"
    if (root / "split_csv" / "1cls.csv").is_file():
        raise _unknown(root, "this is a VisA root; pass one category folder (e.g. <root>/candle)")
    categories = sorted(d.name for d in root.iterdir() if (d / "train" / "good").is_dir())
    if categories:
        raise _unknown(root, f"this holds category folder(s) ({', '.join(categories[:5])}); pass one of them")
    suspicious = _defect_like_dirs(root)
    if suspicious:
        raise _unknown(
            root,
            f"no known layout, and folder(s) {', '.join(suspicious[:5])} look like labelled defects, so it is "
            "not treated as a folder of normal images (pass layout='folder' to use every image as normal)",
        )
    if not list_images(root, recursive=True):
        raise _unknown(root, "no known layout and no images found")
    return "folder"


def discover(root: Path, layout: str = "auto") -> DatasetSplits:
    """Find the train/test (and validation) samples of a dataset folder; see the module docs for layouts."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist or is not a folder; check the path")
    name = layout.strip().lower()
    if name == "auto":
        name = detect_layout(root)
    elif name not in _READERS:
        raise DatasetError(f"unknown layout {layout!r}; supported: auto, {', '.join(LAYOUTS)}")
    splits = _READERS[name](root)
    if not splits.train:
        raise _unknown(root, f"the {name} layout found no training images (expected {_EXPECTED[name]})")
    return splits


def _file_sha256(path: Path) -> str:
    try:
        with Path(path).open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read for fingerprinting ({exc.strerror or exc})") from exc


def fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over sorted (path relative to the samples' common folder, file sha256) pairs.

    Identifies the training data exactly, independent of where the dataset folder lives.
    """
    paths = [Path(s.path).absolute() for s in samples]
    base = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path()
    pairs = sorted((p.relative_to(base).as_posix(), _file_sha256(p)) for p in paths)
    digest = hashlib.sha256()
    for rel, sha in pairs:
        digest.update(f"{rel}\0{sha}\n".encode())
    return digest.hexdigest()


def split_holdout(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministically hold out ``fraction`` of ``samples`` (by sorted path; input order kept).

    A positive fraction holds out at least one sample and always leaves one for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(samples)
    k = round(n * fraction)
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    order = sorted(range(n), key=lambda i: Path(samples[i].path).as_posix())
    chosen = {order[j] for j in np.random.default_rng(seed).permutation(n)[:k]}
    train = [s for i, s in enumerate(samples) if i not in chosen]
    holdout = [s for i, s in enumerate(samples) if i in chosen]
    return train, holdout


def _size_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return int(h), int(w)


class ImageDataset(Dataset):
    """Samples as tensors, all resized to ``image_size`` (int = square) so mixed sizes batch.

    Items: ``image`` float32 [3, H, W] in [0, 1], ``mask`` float32 [1, H, W] of 0/1, ``label``, ``path``,
    ``defect_type``. ``limits`` go to :func:`components.images.decode_image`.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int | tuple[int, int], **limits: int) -> None:
        self.samples = list(samples)
        self.size_hw = _size_hw(image_size)
        self.limits = limits

    def __len__(self) -> int:
        return len(self.samples)

    def _mask(self, sample: Sample, image_hw: tuple[int, int]) -> np.ndarray:
        if sample.mask_path is None:
            return np.zeros(self.size_hw, dtype=bool)
        mask = decode_mask(read_bytes(sample.mask_path), str(sample.mask_path), **self.limits)
        (mh, mw), (ih, iw) = mask.shape, image_hw
        if abs(mh * iw - ih * mw) > 0.02 * ih * mw:
            raise ImageError(
                f"{sample.mask_path}: mask is {mw}x{mh} but its image {sample.path} is {iw}x{ih}; "
                "the mask must have the image's aspect ratio (check that it belongs to this image)"
            )
        return resize_mask(mask, self.size_hw)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | str]:
        sample = self.samples[index]
        image = load_image(sample.path, **self.limits)
        mask = self._mask(sample, image.shape[:2])
        return {
            "image": to_tensor(resize_rgb(image, self.size_hw)),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "label": int(sample.label),
            "path": str(sample.path),
            "defect_type": sample.defect_type,
        }
