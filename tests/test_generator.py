"""Tests for the synthetic anomaly generator G (components/generator.py, components/perlin.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from components.generator import (
    KINDS,
    BatchTextures,
    FolderTextures,
    GeneratorSettings,
    Synthetic,
    make_generator,
    random_rotation,
)
from components.perlin import perlin_batch, perlin_noise

SIZE = 32


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(batch: int = 8, size: int | tuple[int, int] = SIZE, seed: int = 0) -> torch.Tensor:
    """Structured test images in [0, 1]: upsampled low-resolution noise."""
    low = torch.rand(batch, 3, 6, 6, generator=seeded(100 + seed))
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def run(kind: str = "perlin", images: torch.Tensor | None = None, seed: int = 0, **kw) -> Synthetic:
    images = smooth_images() if images is None else images
    return make_generator(GeneratorSettings(kind=kind, **kw))(images, seeded(seed))


# --- shapes, masks, compositing ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_and_ranges(kind: str) -> None:
    out = run(kind, scar_prob=0.5)
    b = 8
    assert out.clean.shape == out.image.shape == (b, 3, SIZE, SIZE)
    assert out.mask.shape == (b, 1, SIZE, SIZE)
    assert out.has_anomaly.shape == (b,) and out.has_anomaly.dtype == torch.bool
    for t in (out.clean, out.image, out.mask):
        assert t.dtype == torch.float32
        assert t.min() >= 0 and t.max() <= 1
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("kind", KINDS)
def test_masks_match_has_anomaly_and_normals_are_untouched(kind: str) -> None:
    out = run(kind, images=smooth_images(16), anomaly_prob=0.5)
    has = out.has_anomaly
    assert 0 < has.sum() < 16, "seed should give a mix of normal and anomalous samples"
    assert torch.equal(out.mask.flatten(1).amax(1) > 0, has)
    assert torch.equal(out.image[~has], out.clean[~has])


@pytest.mark.parametrize("kind", KINDS)
def test_outside_mask_unchanged_inside_changed(kind: str) -> None:
    out = run(kind, images=smooth_images(16), anomaly_prob=1.0, opacity=(1.0, 1.0))
    outside = out.mask.expand_as(out.image) == 0
    assert torch.equal(out.image[outside], out.clean[outside])
    inside = ~outside
    assert (out.image - out.clean).abs()[inside].mean() > 0.05


def test_opacity_scales_the_change() -> None:
    images = smooth_images(16)
    diffs = []
    for opacity in (0.2, 1.0):
        out = run(images=images, anomaly_prob=1.0, opacity=(opacity, opacity))
        inside = out.mask.expand_as(out.image) > 0
        diffs.append((out.image - out.clean).abs()[inside].mean().item())
    assert diffs[0] == pytest.approx(0.2 * diffs[1], rel=1e-3)


def test_anomaly_fraction_follows_anomaly_prob() -> None:
    gen = make_generator(GeneratorSettings(anomaly_prob=0.3, max_scale=3))
    rng = seeded(1)
    images = smooth_images(32, size=16)
    has = torch.cat([gen(images, rng).has_anomaly for _ in range(10)])
    assert abs(has.float().mean().item() - 0.3) < 0.08
    for prob in (0.0, 1.0):
        out = run(images=smooth_images(16), anomaly_prob=prob)
        assert out.has_anomaly.float().mean().item() == prob
        assert torch.equal(out.mask.flatten(1).amax(1) > 0, out.has_anomaly)


def test_empty_perlin_masks_are_forced_non_empty() -> None:
    # Threshold 0.95 is almost never reached: every anomalous sample must still get a mask.
    out = run(images=smooth_images(8), anomaly_prob=1.0, threshold=0.95, min_scale=0, max_scale=1)
    assert (out.mask.flatten(1).sum(1) > 0).all()


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_bit_identical_different_seed_differs(kind: str) -> None:
    a, b, c = (run(kind, seed=s) for s in (5, 5, 6))
    for field in ("clean", "image", "mask", "has_anomaly"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.image, c.image)


# --- rotation ---------------------------------------------------------------------------------


def test_no_rotation_keeps_images_exactly() -> None:
    images = smooth_images(4)
    assert torch.equal(random_rotation(images, 0.0, False, seeded()), images)


def test_rotate90_only_gives_exact_quarter_turns() -> None:
    images = smooth_images(8)
    rotated = random_rotation(images, 0.0, True, seeded())
    for img, rot in zip(images, rotated, strict=True):
        assert any(torch.equal(torch.rot90(img, k, dims=(1, 2)), rot) for k in range(4))


def test_small_rotation_changes_but_stays_close() -> None:
    images = smooth_images(4)
    rotated = random_rotation(images, 10.0, False, seeded())
    diff = (rotated - images).abs().mean()
    assert 0 < diff < 0.1


def test_non_square_images_keep_their_shape() -> None:
    images = smooth_images(8, size=(24, 40))
    for kind in KINDS:
        out = run(kind, images=images, anomaly_prob=1.0)
        assert out.image.shape == (8, 3, 24, 40) and out.mask.shape == (8, 1, 24, 40)
    rotated = random_rotation(images, 0.0, True, seeded())
    for img, rot in zip(images, rotated, strict=True):
        assert torch.equal(img, rot) or torch.equal(torch.rot90(img, 2, dims=(1, 2)), rot)


# --- Perlin noise -----------------------------------------------------------------------------


def test_perlin_noise_shape_range_determinism() -> None:
    noise = perlin_noise((40, 24), (4, 2), seeded(3))
    assert noise.shape == (40, 24)
    assert noise.abs().max() <= 1.0 and noise.std() > 0.1
    assert torch.equal(noise, perlin_noise((40, 24), (4, 2), seeded(3)))


def test_perlin_noise_is_smooth_at_its_scale() -> None:
    coarse, fine = (perlin_noise((64, 64), (r, r), seeded()) for r in (2, 16))

    def roughness(n: torch.Tensor) -> float:
        return n.diff(dim=1).abs().mean().item()

    assert roughness(fine) > 3 * roughness(coarse)


def test_perlin_batch_scales_vary() -> None:
    noise = perlin_batch(64, (SIZE, SIZE), 0, 5, seeded(4))
    assert noise.shape == (64, SIZE, SIZE)
    roughness = noise.diff(dim=2).abs().mean(dim=(1, 2))
    assert roughness.max() > 5 * roughness.min()


def test_perlin_mask_coverage_varies() -> None:
    out = run(images=smooth_images(32), anomaly_prob=1.0)
    coverage = out.mask.mean(dim=(1, 2, 3))
    assert coverage.max() > 2 * coverage.min()


# --- textures ---------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture
def texture_dir(tmp_path: Path) -> Path:
    """Four solid-colour images in nested folders, plus a file that is not an image."""
    for i, colour in enumerate(COLOURS):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if i % 2 == 0 else ".jpg"
        Image.new("RGB", (20 + 4 * i, 16), colour).save(folder / f"t{i}{suffix}")
    (tmp_path / "images" / "README.txt").write_text("not an image")
    return tmp_path


def test_folder_textures_sample_and_cache(texture_dir: Path) -> None:
    textures = FolderTextures(texture_dir, max_cached=2)
    assert len(textures.files) == 4
    pool = torch.zeros(2, 3, 24, 24)
    sample = textures.sample(pool, 6, seeded())
    assert sample.shape == (6, 3, 24, 24) and sample.dtype == pool.dtype
    palette = torch.tensor(COLOURS, dtype=torch.float32) / 255
    colours = sample.mean(dim=(2, 3))
    assert (torch.cdist(colours, palette).amin(dim=1) < 0.05).all(), "each texture is one of the files"
    assert len(textures._cache) <= 2


def test_generator_uses_texture_dir(texture_dir: Path) -> None:
    out = run(images=smooth_images(8), anomaly_prob=1.0, opacity=(1.0, 1.0), texture_dir=texture_dir)
    palette = torch.tensor(COLOURS, dtype=torch.float32) / 255
    for img, mask in zip(out.image, out.mask, strict=True):
        pixels = img[:, mask[0] > 0].T
        assert (torch.cdist(pixels, palette).amin(dim=1) < 0.05).all()


def test_builtin_textures_mix_augmented_and_noise() -> None:
    pool = smooth_images(4)
    textures = BatchTextures(noise_prob=0.5)
    sample = textures.sample(pool, 16, seeded())
    assert sample.shape == (16, 3, SIZE, SIZE)
    assert sample.min() >= 0 and sample.max() <= 1
    noise_only = BatchTextures(noise_prob=1.0).sample(pool, 4, seeded())
    augmented = BatchTextures(noise_prob=0.0).sample(pool, 4, seeded())
    assert not torch.equal(noise_only, augmented)


# --- cutpaste ---------------------------------------------------------------------------------


def test_cutpaste_pastes_a_rectangle_of_the_image() -> None:
    out = run("cutpaste", images=smooth_images(8), anomaly_prob=1.0, cutpaste_jitter=0.0)
    for clean, img, mask in zip(out.clean, out.image, out.mask, strict=True):
        rows, cols = mask[0].nonzero(as_tuple=True)
        box = mask[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all(), "mask is one filled rectangle"
        area = box.numel() / SIZE**2
        assert 0.01 <= area <= 0.2
        patch = img[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        windows = clean.unfold(1, box.shape[0], 1).unfold(2, box.shape[1], 1)  # [3, nh, nw, ph, pw]
        match = (windows == patch[:, None, None]).flatten(3).all(3).all(0)
        assert match.any(), "pasted patch is a copy of some region of I_R"


def test_cutpaste_scars_are_small() -> None:
    out = run("cutpaste", images=smooth_images(8, size=64), anomaly_prob=1.0, scar_prob=1.0)
    coverage = out.mask.mean(dim=(1, 2, 3))
    assert (coverage > 0).all() and (coverage < 0.02).all()


# --- devices ----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_runs_on_cuda_with_cpu_generator(kind: str) -> None:
    images = smooth_images(8).cuda()
    out = run(kind, images=images, seed=3)
    again = run(kind, images=images, seed=3)
    assert out.image.is_cuda and out.mask.is_cuda and out.has_anomaly.is_cuda
    assert torch.equal(out.image, again.image) and torch.equal(out.mask, again.mask)
    assert torch.equal(out.mask.flatten(1).amax(1) > 0, out.has_anomaly)
    outside = out.mask.expand_as(out.image) == 0
    assert torch.equal(out.image[outside], out.clean[outside])
    # The anomaly draw comes before any data-dependent branch, so it matches the CPU run.
    assert torch.equal(run(kind, seed=3).has_anomaly, out.has_anomaly.cpu())


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kind": "draem"}, "kind"),
        ({"anomaly_prob": 1.5}, "anomaly_prob"),
        ({"opacity": (0.8, 0.2)}, "opacity"),
        ({"opacity": (-0.1, 0.5)}, "opacity"),
        ({"min_scale": 4, "max_scale": 2}, "min_scale"),
        ({"threshold": 1.0}, "threshold"),
        ({"max_rotation_deg": -5}, "max_rotation_deg"),
        ({"scar_prob": 2}, "scar_prob"),
    ],
)
def test_bad_settings_raise_clear_errors(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GeneratorSettings(**changes)


def test_bad_texture_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        make_generator(GeneratorSettings(texture_dir=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        make_generator(GeneratorSettings(texture_dir=tmp_path / "empty"))


def test_settings_mutated_after_construction_are_rechecked() -> None:
    settings = GeneratorSettings()
    settings.kind = "nope"
    with pytest.raises(ValueError, match="kind"):
        make_generator(settings)


@pytest.mark.parametrize("shape", [(3, SIZE, SIZE), (2, 1, SIZE, SIZE)])
def test_bad_images_raise(shape: tuple[int, ...]) -> None:
    gen = make_generator(GeneratorSettings())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        gen(torch.rand(shape), seeded())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        gen(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), seeded())


def test_settings_accept_yaml_style_values(tmp_path: Path) -> None:
    settings = GeneratorSettings(opacity=[0.3, 0.9], texture_dir=str(tmp_path))
    assert settings.opacity == (0.3, 0.9) and isinstance(settings.texture_dir, Path)
