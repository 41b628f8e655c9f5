"""Dataset layouts, fingerprint, holdout split, ImageDataset batching and the demo dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from components.datasets import (
    DatasetError,
    ImageDataset,
    Sample,
    discover,
    fingerprint,
    is_mask,
    split_holdout,
)
from components.demo_data import DEFECT_TYPES, make_demo_dataset
from components.images import ImageError


def img(path: Path, size=(16, 12), value=100, mode="RGB", fmt=None) -> Path:
    """Write a small solid image (size is width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, fmt)
    return path


def mask(path: Path, size=(16, 12), box=(2, 2, 6, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = Image.new("L", size, 0)
    m.paste(255, box)
    m.save(path)
    return path


@pytest.fixture()
def mvtec(tmp_path: Path) -> Path:
    root = tmp_path / "widget"
    for i in (2, 0, 1):
        img(root / "train" / "good" / f"{i:03d}.png")
    (root / "train" / "good" / "._000.png").write_bytes(b"macOS resource fork")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    img(root / "validation" / "good" / "000.png")
    img(root / "test" / "good" / "000.png")
    img(root / "test" / "crack" / "000.png")
    img(root / "test" / "crack" / "001.png")
    mask(root / "ground_truth" / "crack" / "000_mask.png")
    mask(root / "ground_truth" / "crack" / "001.png")  # bare-stem masks are accepted too
    return root


def test_mvtec_layout(mvtec: Path) -> None:
    splits = discover(mvtec)
    assert splits.layout == "mvtec" and splits.root == mvtec
    assert [s.path.name for s in splits.train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.mask_path is None and s.defect_type == "good" for s in splits.train)
    assert [s.path.name for s in splits.validation] == ["000.png"]
    assert [(s.defect_type, s.label, s.path.name) for s in splits.test] == [
        ("crack", 1, "000.png"),
        ("crack", 1, "001.png"),
        ("good", 0, "000.png"),
    ]
    assert [s.mask_path.name for s in splits.test[:2]] == ["000_mask.png", "001.png"]
    assert "train 3, validation 1, test 1 good / 2 defective" in splits.summary()
    assert discover(mvtec, "mvtec") == splits


def test_missing_mask_named(mvtec: Path) -> None:
    (mvtec / "ground_truth" / "crack" / "001.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)1 defective test image.*test/crack/001\.png"):
        discover(mvtec)


def test_empty_train_and_unknown(tmp_path: Path) -> None:
    (tmp_path / "a" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        discover(tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"(?s)no known layout.*mvtec: train/good/.*btad"):
        discover(tmp_path / "b")
    with pytest.raises(ValueError, match="unknown layout 'coco'"):
        discover(tmp_path / "a", "coco")
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "missing")


def test_multi_category_root_refused(mvtec: Path) -> None:
    with pytest.raises(DatasetError, match=r"category folder\(s\) \(widget\)"):
        discover(mvtec.parent)


def test_btad_layout(tmp_path: Path) -> None:
    for i in range(2):
        img(tmp_path / "train" / "ok" / f"{i:04d}.bmp")
    img(tmp_path / "test" / "ok" / "0000.bmp")
    img(tmp_path / "test" / "ko" / "0000.bmp")
    mask(tmp_path / "ground_truth" / "ko" / "0000.png")
    splits = discover(tmp_path)
    assert splits.layout == "btad" and len(splits.train) == 2
    assert [(s.defect_type, s.label) for s in splits.test] == [("ko", 1), ("good", 0)]
    assert splits.test[0].mask_path == tmp_path / "ground_truth" / "ko" / "0000.png"


def _visa_category(root: Path) -> Path:
    cat = root / "candle"
    for i in range(3):
        img(cat / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", fmt="JPEG")
    img(cat / "Data" / "Images" / "Anomaly" / "000.JPG", fmt="JPEG")
    mask(cat / "Data" / "Masks" / "Anomaly" / "000.png")
    return cat


def test_visa_with_split_csv(tmp_path: Path) -> None:
    cat = _visa_category(tmp_path)
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "\ufeffobject,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0002.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,\n",
        encoding="utf-8",
    )
    splits = discover(cat)
    assert splits.layout == "visa"
    assert [s.path.name for s in splits.train] == ["0000.JPG", "0001.JPG"]
    assert [(s.label, s.defect_type, s.path.name) for s in splits.test] == [
        (1, "anomaly", "000.JPG"),
        (0, "good", "0002.JPG"),
    ]
    assert splits.test[0].mask_path == cat / "Data" / "Masks" / "Anomaly" / "000.png"
    with pytest.raises(DatasetError, match="VisA root"):
        discover(tmp_path)
    renamed = cat.rename(tmp_path / "my_candles")
    with pytest.raises(DatasetError, match="no rows with object='my_candles'"):
        discover(renamed)


def test_visa_without_split_csv(tmp_path: Path) -> None:
    splits = discover(_visa_category(tmp_path), "visa")
    assert len(splits.train) == 3 and [s.label for s in splits.test] == [1]


def test_is_mask_tells_masks_from_images(mvtec: Path, tmp_path: Path) -> None:
    for root, layout in ((mvtec, "mvtec"), (_visa_category(tmp_path), "visa")):
        samples = [*(s := discover(root, layout)).train, *s.test]
        masks = [x.mask_path.relative_to(root) for x in samples if x.mask_path is not None]
        assert masks and all(map(is_mask, masks))
        assert not any(is_mask(x.path.relative_to(root)) for x in samples)


def test_folder_layout(tmp_path: Path) -> None:
    img(tmp_path / "line2" / "b.png")
    img(tmp_path / "line1" / "a.jpg", fmt="JPEG")
    img(tmp_path / "c.tif")
    (tmp_path / ".cache").mkdir()
    img(tmp_path / ".cache" / "x.png")
    splits = discover(tmp_path)
    assert splits.layout == "folder" and splits.test == []
    assert [s.path.relative_to(tmp_path).as_posix() for s in splits.train] == [
        "c.tif",
        "line1/a.jpg",
        "line2/b.png",
    ]
    img(tmp_path / "defects" / "d.png")
    with pytest.raises(DatasetError, match="look like labelled defects"):
        discover(tmp_path)
    assert len(discover(tmp_path, "folder").train) == 4


def test_fingerprint(tmp_path: Path, mvtec: Path) -> None:
    train = discover(mvtec).train
    fp = fingerprint(train)
    assert len(fp) == 64 and fp == fingerprint(list(reversed(train)))
    moved = shutil.copytree(mvtec, tmp_path / "elsewhere" / "widget")
    assert fingerprint(discover(moved).train) == fp  # independent of the folder's location
    img(moved / "train" / "good" / "001.png", value=101)
    assert fingerprint(discover(moved).train) != fp
    (moved / "train" / "good" / "001.png").rename(moved / "train" / "good" / "009.png")
    assert fingerprint(discover(moved).train) not in (fp, fingerprint(train[:2]))


def test_split_holdout() -> None:
    samples = [Sample(Path(f"/d/{i:02d}.png"), 0, None, "good") for i in range(20)]
    train, hold = split_holdout(samples, 0.2, seed=3)
    assert len(hold) == 4 and len(train) == 16 and not set(train) & set(hold)
    assert split_holdout(list(reversed(samples)), 0.2, seed=3)[1] == list(reversed(hold))
    assert split_holdout(samples, 0.2, seed=4)[1] != hold
    assert split_holdout(samples, 0.0, seed=3) == (samples, [])
    assert [len(x) for x in split_holdout(samples[:2], 0.01, seed=0)] == [1, 1]
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(samples, 1.0, seed=0)


def test_image_dataset_mixed_inputs_batch(tmp_path: Path) -> None:
    a16 = np.full((20, 30), 65535, np.uint16)
    paths = [
        img(tmp_path / "grey.png", (40, 30), 50, "L"),
        img(tmp_path / "rgba.png", (25, 25), (10, 20, 30, 255), "RGBA"),
        img(tmp_path / "pal.gif", (33, 17), 3, "P"),
        img(tmp_path / "cmyk.jpg", (18, 40), (0, 0, 0, 0), "CMYK", "JPEG"),
        img(tmp_path / "x.bmp", (64, 48), (1, 2, 3)),
    ]
    Image.fromarray(a16).save(tmp_path / "deep.png")
    samples = [Sample(p, 0, None, "good") for p in [*paths, tmp_path / "deep.png"]]
    samples.append(Sample(paths[-1], 1, mask(tmp_path / "m.png", (32, 24), (0, 0, 16, 12)), "dent"))
    ds = ImageDataset(samples, (24, 32))
    batch = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert batch["image"].shape == (7, 3, 24, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (7, 1, 24, 32)
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert batch["image"][5].min() == 1.0  # 16-bit full scale -> 1.0
    assert batch["mask"][:6].sum() == 0 and batch["mask"][6].sum() == 16 * 12
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert batch["label"].tolist() == [0] * 6 + [1] and batch["defect_type"][6] == "dent"
    assert ImageDataset(samples[:1], 16)[0]["image"].shape == (3, 16, 16)


def test_image_dataset_errors(tmp_path: Path) -> None:
    good = img(tmp_path / "a.png", (32, 24))
    wrong = mask(tmp_path / "wrong.png", (24, 24))
    with pytest.raises(ImageError, match=r"wrong\.png: mask is 24x24 but its image .*a\.png is 32x24"):
        ImageDataset([Sample(good, 1, wrong, "x")], 16)[0]
    with pytest.raises(ImageError, match=r"gone\.png"):
        ImageDataset([Sample(tmp_path / "gone.png", 0, None, "good")], 16)[0]


@pytest.mark.realdata
def test_real_bottle(bottle_dir: Path) -> None:
    splits = discover(bottle_dir)
    assert (len(splits.train), len(splits.test), sum(s.label for s in splits.test)) == (209, 83, 63)
    assert {s.defect_type for s in splits.test} == {"good", "broken_large", "broken_small", "contamination"}
    item = ImageDataset([s for s in splits.test if s.label][:1], 64)[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].sum() > 0


@pytest.mark.realdata
def test_real_tire_validation(tire_dir: Path) -> None:
    splits = discover(tire_dir)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (210, 29, 112)
    item = ImageDataset(splits.test[-1:], (48, 64))[0]
    assert item["image"].shape == (3, 48, 64) and item["label"] == 1


def test_demo_dataset(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    kw = {"n_train": 3, "n_test_good": 2, "n_test_defect": 3, "image_size": 64, "seed": 1}
    assert make_demo_dataset(out, texture="gravel", **kw) == out
    splits = discover(out)
    assert len(splits.train) == 3 and {s.defect_type for s in splits.test} == {"good", *DEFECT_TYPES}
    for s in splits.test:
        pixels = np.asarray(Image.open(s.path))
        assert pixels.shape == (64, 64, 3)
        if s.label:
            m = np.asarray(Image.open(s.mask_path))
            assert m.shape == (64, 64) and set(np.unique(m)) == {0, 255} and (m > 0).sum() >= 8
    meta = json.loads((out / "SOURCE.json").read_text())
    assert meta["synthetic"] and meta["texture_source"] == "skimage.data.gravel"
    assert "scikit-image" in (out / "readme.txt").read_text()
    fp = fingerprint(splits.test)
    make_demo_dataset(out, texture="gravel", **kw)  # an earlier demo is replaced, identically
    assert fingerprint(discover(out).test) == fp
    other = img(tmp_path / "mine" / "keep.png")
    with pytest.raises(FileExistsError, match="not an earlier demo"):
        make_demo_dataset(other.parent, **kw)
    assert other.exists()


def test_demo_defects_change_only_masked_pixels(tmp_path: Path) -> None:
    from components.demo_data import TEXTURES, _defect_image, _normal_image, _texture

    tex = _texture("brick")
    for kind in DEFECT_TYPES:
        base = _normal_image(tex, "brick", 64, np.random.default_rng(0))
        out, m = _defect_image(base, kind, np.random.default_rng(1))
        changed = np.abs(out - base).max(axis=2) > 0
        assert changed.any() and not (changed & ~m).any(), kind
        delta = np.abs(out - base)[m].mean()
        assert 0.02 < delta < 0.5, (kind, delta)  # visible but not saturating
    assert set(TEXTURES) == {"brick", "grass", "gravel"}
