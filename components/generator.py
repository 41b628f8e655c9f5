"""Synthetic anomaly generator G: turns a batch of normal images into (I_R, I_G, mask).

Every kind shares one pipeline (``AnomalyGenerator.__call__``):

1. I_R = the batch after a slight random rotation (within +-``max_rotation_deg``, reflection
   padding, so no black corners) and a random multiple of 90 degrees (k in 0..3 for square
   images, k in {0, 2} otherwise).
2. Each sample is anomalous with probability ``anomaly_prob``; the others keep I_G == I_R and an
   all-zero mask. Anomalous samples always get a non-empty mask.
3. The kind draws the anomaly for the anomalous samples only:

   - ``"perlin"`` (ToCoAD/DRAEM): P = rotated Perlin noise at a random 2^a x 2^b scale, thresholded;
     A = a texture sample; I_G = (1 - P) I_R + (1 - beta) P A + beta P I_R with opacity 1 - beta
     drawn from ``opacity``.
   - ``"rectangle"`` (ablation): P = 1..3 random rectangles, same texture and blend.
   - ``"cutpaste"`` (ablation, CutPaste): a random rectangle of I_R itself, colour-jittered, pasted
     elsewhere; with ``scar_prob`` a thin rotated "scar" patch instead. No blending.

Textures: ``FolderTextures`` reads any folder of images (DTD's ``images/<class>/*.jpg`` works).
The default, used when ``texture_dir`` is None, is ``BatchTextures``: it needs no download, and
it mixes other images of the same batch, heavily augmented (crop, rotation, flips, channel
permutation, colour jitter, inversion, posterize, solarize) which gives anomalies with realistic,
in-distribution textures, with coloured Perlin noise, which adds out-of-distribution ones.

Everything is vectorised over the batch in torch, runs on the images' device, and draws all
randomness from the ``torch.Generator`` passed in, so one seed gives bit-identical outputs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from components.perlin import Device, perlin_batch, rand, randint

KINDS = ("perlin", "cutpaste", "rectangle")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MASK_RETRIES = 3
MIN_MASK_FRACTION = 0.01  # fallback mask size when Perlin noise stays below the threshold
PATCH_AREA = (0.02, 0.15)  # CutPaste / rectangle area as a fraction of the image
PATCH_ASPECT = (0.3, 3.3)


# ---------------------------------------------------------------------------------------------
# Settings and result


@dataclass
class GeneratorSettings:
    """Configuration of G; ranges are validated on construction."""

    kind: str = "perlin"
    anomaly_prob: float = 0.5
    opacity: tuple[float, float] = (0.2, 1.0)
    min_scale: int = 0
    max_scale: int = 6
    threshold: float = 0.5
    max_rotation_deg: float = 10.0
    rotate90: bool = True
    texture_dir: Path | None = None
    scar_prob: float = 0.0  # cutpaste: share of thin rotated "scar" patches
    cutpaste_jitter: float = 0.1  # cutpaste: brightness/contrast/saturation jitter of the patch

    def __post_init__(self) -> None:
        self.opacity = tuple(float(v) for v in self.opacity)  # YAML gives lists
        if self.texture_dir is not None:
            self.texture_dir = Path(self.texture_dir)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field to fix."""
        lo_hi = self.opacity
        checks = [
            (self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}"),
            (0.0 <= self.anomaly_prob <= 1.0, f"anomaly_prob must be in [0, 1], got {self.anomaly_prob}"),
            (
                len(lo_hi) == 2 and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0,
                f"opacity must be (low, high) with 0 <= low <= high <= 1, got {lo_hi}",
            ),
            (
                0 <= self.min_scale <= self.max_scale <= 10,
                f"need 0 <= min_scale <= max_scale <= 10, got {self.min_scale}, {self.max_scale}",
            ),
            (
                -1.0 < self.threshold < 1.0,
                f"threshold must be in (-1, 1) (noise range), got {self.threshold}",
            ),
            (
                0.0 <= self.max_rotation_deg <= 180.0,
                f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg}",
            ),
            (0.0 <= self.scar_prob <= 1.0, f"scar_prob must be in [0, 1], got {self.scar_prob}"),
            (
                0.0 <= self.cutpaste_jitter < 1.0,
                f"cutpaste_jitter must be in [0, 1), got {self.cutpaste_jitter}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GeneratorSettings: {message}")


@dataclass
class Synthetic:
    """Output of G for one batch."""

    clean: Tensor  # I_R [B, 3, H, W]
    image: Tensor  # I_G [B, 3, H, W]
    mask: Tensor  # [B, 1, H, W], 0/1
    has_anomaly: Tensor  # [B] bool


# ---------------------------------------------------------------------------------------------
# Small batched helpers


def _uniform(generator: torch.Generator, low: float, high: float, n: int, device: Device) -> Tensor:
    return low + (high - low) * rand(generator, n, device=device)


def _affine_sample(images: Tensor, mat: Tensor, shift: Tensor) -> Tensor:
    """Bilinear resample with reflection padding: output(p) = images(mat @ p + shift), normalised coords.

    ``mat`` [B, 2, 2] and ``shift`` [B, 2] act on (x, y) in [-1, 1].
    """
    b, _, h, w = images.shape
    xs = ((2 * torch.arange(w, device=images.device, dtype=images.dtype) + 1) / w - 1).view(1, 1, w, 1)
    ys = ((2 * torch.arange(h, device=images.device, dtype=images.dtype) + 1) / h - 1).view(1, h, 1, 1)
    cols = mat[:, :, 0].to(images.dtype).view(b, 1, 1, 2)  # d(x, y)_source / dx_output
    rows = mat[:, :, 1].to(images.dtype).view(b, 1, 1, 2)  # d(x, y)_source / dy_output
    # [B, H, W, 2] by broadcasting: several times cheaper than F.affine_grid's batched matmul on CPU.
    grid = cols * xs + (rows * ys + shift.to(images.dtype).view(b, 1, 1, 2))
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _rotation_matrix(angle: Tensor, h: int, w: int) -> Tensor:
    """[B, 2, 2] rotation by ``angle`` (radians) in pixel space, expressed in normalised coords."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack((cos, -sin * (h / w), sin * (w / h), cos), dim=-1).view(-1, 2, 2)


def random_rotation(images: Tensor, max_deg: float, rotate90: bool, generator: torch.Generator) -> Tensor:
    """I_R: slight random rotation plus a random multiple of 90 degrees (180 only if non-square)."""
    b, _, h, w = images.shape
    if rotate90:
        k = randint(generator, 0, 4, b, device=images.device)
        if h != w:
            k = (k // 2) * 2
    else:
        k = torch.zeros(b, dtype=torch.long, device=images.device)
    if max_deg == 0:  # exact path: pure 90-degree turns
        out = images.clone()
        for turns in range(1, 4):
            idx = (k == turns).nonzero().view(-1)
            if idx.numel():
                out[idx] = torch.rot90(images[idx], turns, dims=(2, 3))
        return out
    angle = (2 * rand(generator, b, device=images.device) - 1) * math.radians(max_deg) + k * (math.pi / 2)
    return _affine_sample(images, _rotation_matrix(angle, h, w), torch.zeros(b, 2, device=images.device))


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor [B, 3, H, W] in [0, 1], got {tuple(images.shape)} {images.dtype}"
        )


# ---------------------------------------------------------------------------------------------
# Texture sources


class TextureSource(Protocol):
    """Something that yields texture images A."""

    def sample(self, pool: Tensor, count: int, generator: torch.Generator) -> Tensor:
        """``count`` textures [count, 3, H, W] in [0, 1], on ``pool``'s device/dtype; ``pool`` = I_R batch."""
        ...


class FolderTextures:
    """Textures from any folder of images (recursive), random crops resized to H x W.

    Decoded images are kept in an LRU cache of ``max_cached`` entries, each downscaled so that
    its longer side is at most ``max_side`` (about 200 MB at the defaults). The cache lives in
    the process that samples, so each DataLoader worker holds its own.
    """

    def __init__(self, root: Path | str, max_cached: int = 256, max_side: int = 512) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(
                f"texture_dir {root} does not exist or is not a folder: point it at a folder of "
                "texture images (e.g. DTD's images/) or set it to None for the built-in textures"
            )
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(
                f"texture_dir {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                "add texture images or set texture_dir to None for the built-in textures"
            )
        self.max_cached = max_cached
        self.max_side = max_side
        self._cache: OrderedDict[int, Tensor] = OrderedDict()

    def _load(self, index: int) -> Tensor:
        """uint8 [3, h, w] of file ``index``, through the LRU cache."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        with Image.open(self.files[index]) as img:
            img = img.convert("RGB")
            img.thumbnail((self.max_side, self.max_side))
            tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
        self._cache[index] = tensor
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return tensor

    def sample(self, pool: Tensor, count: int, generator: torch.Generator) -> Tensor:
        h, w = pool.shape[-2:]
        which = randint(generator, 0, len(self.files), count).tolist()
        params = rand(generator, count, 3).tolist()  # crop size, crop y, crop x
        crops = []
        for index, (size, fy, fx) in zip(which, params, strict=True):
            img = self._load(index)
            ih, iw = img.shape[-2:]
            ch = max(1, min(ih, round((0.3 + 0.7 * size) * min(ih, iw * h / w))))
            cw = max(1, min(iw, round(ch * w / h)))
            y0, x0 = int(fy * (ih - ch + 1)), int(fx * (iw - cw + 1))
            crop = img[None, :, y0 : y0 + ch, x0 : x0 + cw].float() / 255
            crops.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(crops).clamp_(0, 1).to(device=pool.device, dtype=pool.dtype)


_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


class BatchTextures:
    """Built-in textures: augmented images from the batch itself, or coloured Perlin noise.

    ``noise_prob`` is the share of coloured-noise textures; ``noise_scales`` the Perlin scale range
    (2^a cells per axis) of the noise.
    """

    def __init__(self, noise_prob: float = 0.5, noise_scales: tuple[int, int] = (1, 4)) -> None:
        self.noise_prob = noise_prob
        self.noise_scales = noise_scales

    def sample(self, pool: Tensor, count: int, generator: torch.Generator) -> Tensor:
        out = torch.empty(count, *pool.shape[1:], device=pool.device, dtype=pool.dtype)
        use_noise = rand(generator, count, device=pool.device) < self.noise_prob
        noisy, augmented = use_noise.nonzero().view(-1), (~use_noise).nonzero().view(-1)
        if augmented.numel():
            out[augmented] = self.augment(pool, augmented.numel(), generator)
        if noisy.numel():
            out[noisy] = self.colour_noise(noisy.numel(), pool, generator)
        return out

    @staticmethod
    def augment(pool: Tensor, count: int, generator: torch.Generator) -> Tensor:
        """``count`` random pool images, heavily augmented.

        Channel permutation, crop-resize with rotation and flips, brightness/contrast/saturation,
        and each with probability 0.3: inversion, posterize, solarize.
        """
        b, c, h, w = pool.shape
        dev = pool.device
        source = randint(generator, 0, b, count, 1, device=dev)
        perm = _PERMUTATIONS.to(dev)[randint(generator, 0, 6, count, device=dev)]
        x = pool.reshape(b * c, h, w)[(source * c + perm).view(-1)].view(count, c, h, w)

        zoom = _uniform(generator, 0.25, 1.0, count, dev)
        flips = torch.where(rand(generator, count, 2, device=dev) < 0.5, -1.0, 1.0)
        angle = _uniform(generator, -math.pi, math.pi, count, dev)
        mat = _rotation_matrix(angle, h, w) * (zoom.view(count, 1, 1) * flips.view(count, 1, 2))
        shift = (2 * rand(generator, count, 2, device=dev) - 1) * (1 - zoom).view(count, 1)
        x = _affine_sample(x, mat, shift)

        def factor(low: float, high: float) -> Tensor:
            return _uniform(generator, low, high, count, dev).view(count, 1, 1, 1).to(x.dtype)

        # Brightness b then contrast k about the mean m: k * b * x + (1 - k) * b * m, in one pass.
        bright, contrast = factor(0.5, 1.5), factor(0.5, 1.5)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.addcmul((1 - contrast) * bright * mean, x, contrast * bright)
        x = torch.lerp(x.mean(dim=1, keepdim=True), x, factor(0.0, 2.0)).clamp_(0, 1)  # saturation

        levels = (2 ** randint(generator, 1, 5, count, device=dev)).view(count, 1, 1, 1).to(x.dtype)
        cut = factor(0.3, 0.8)
        ops = (
            lambda y, i: 1 - y,  # invert
            lambda y, i: torch.round(y * (levels[i] - 1)) / (levels[i] - 1),  # posterize
            lambda y, i: torch.where(y > cut[i], 1 - y, y),  # solarize
        )
        for op in ops:
            chosen = (rand(generator, count, device=dev) < 0.3).nonzero().view(-1)
            if chosen.numel():
                x[chosen] = op(x[chosen], chosen)
        return x

    def colour_noise(self, count: int, pool: Tensor, generator: torch.Generator) -> Tensor:
        """Independent Perlin noise per channel, mapped between two random colours."""
        h, w = pool.shape[-2:]
        noise = perlin_batch(count * 3, (h, w), *self.noise_scales, generator, device=pool.device)
        noise = noise.view(count, 3, h, w)
        low = rand(generator, count, 3, device=pool.device).view(count, 3, 1, 1)
        high = rand(generator, count, 3, device=pool.device).view(count, 3, 1, 1)
        return torch.lerp(low, high, (noise + 0.5).clamp_(0, 1)).to(pool.dtype)


# ---------------------------------------------------------------------------------------------
# Generators


class AnomalyGenerator:
    """G: the shared pipeline; subclasses implement ``anomalies`` for the anomalous samples."""

    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings

    def __call__(self, images: Tensor, generator: torch.Generator) -> Synthetic:
        """Rotate ``images`` into I_R, add anomalies to a random subset, return I_R, I_G, mask."""
        _check_images(images)
        s = self.settings
        clean = random_rotation(images, s.max_rotation_deg, s.rotate90, generator)
        b, _, h, w = clean.shape
        has_anomaly = rand(generator, b, device=clean.device) < s.anomaly_prob
        image = clean.clone()
        mask = torch.zeros(b, 1, h, w, device=clean.device, dtype=clean.dtype)
        idx = has_anomaly.nonzero().view(-1)
        if idx.numel():
            target = clean[idx]
            altered, region = self.anomalies(target, clean, generator)
            image[idx] = torch.where(region > 0, altered, target)
            mask[idx] = region
        return Synthetic(clean=clean, image=image, mask=mask, has_anomaly=has_anomaly)

    def anomalies(self, target: Tensor, pool: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(altered images, non-empty 0/1 masks [n, 1, H, W]) for ``target``; ``pool`` = whole I_R batch."""
        raise NotImplementedError


class TexturedGenerator(AnomalyGenerator):
    """Blends a texture A into I_R inside a mask P: I_G = I_R + opacity * P * (A - I_R)."""

    def __init__(self, settings: GeneratorSettings, textures: TextureSource) -> None:
        super().__init__(settings)
        self.textures = textures

    def anomalies(self, target: Tensor, pool: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = target.shape[0]
        mask = self.make_mask(n, target.shape[-2:], generator, target.device).to(target.dtype)
        texture = self.textures.sample(pool, n, generator)
        opacity = _uniform(generator, *self.settings.opacity, n, target.device).view(n, 1, 1, 1)
        # == (1 - P) I_R + (1 - beta) P A + beta P I_R with 1 - beta = opacity.
        return torch.lerp(target, texture, mask * opacity.to(target.dtype)), mask

    def make_mask(self, n: int, shape: torch.Size, generator: torch.Generator, device: Device) -> Tensor:
        """Non-empty 0/1 masks [n, 1, H, W]."""
        raise NotImplementedError


class PerlinGenerator(TexturedGenerator):
    """ToCoAD/DRAEM anomalies: thresholded rotated Perlin noise at random scales."""

    def make_mask(self, n: int, shape: torch.Size, generator: torch.Generator, device: Device) -> Tensor:
        s = self.settings
        size = (int(shape[0]), int(shape[1]))

        def draw(count: int) -> Tensor:
            return perlin_batch(count, size, s.min_scale, s.max_scale, generator, device=device)

        noise = draw(n)
        for _ in range(MASK_RETRIES):
            empty = (noise.flatten(1).amax(1) <= s.threshold).nonzero().view(-1)
            if not empty.numel():
                break
            noise[empty] = draw(empty.numel())
        mask = noise > s.threshold
        empty = (~mask.flatten(1).any(1)).nonzero().view(-1)
        if empty.numel():  # still empty: keep the top MIN_MASK_FRACTION of the noise
            k = max(1, int(MIN_MASK_FRACTION * size[0] * size[1]))
            kth = noise[empty].flatten(1).topk(k, dim=1).values[:, -1]
            mask[empty] = noise[empty] >= kth.view(-1, 1, 1)
        return mask[:, None]


def _patch_sizes(generator: torch.Generator, n: int, h: int, w: int, device: Device) -> tuple[Tensor, Tensor]:
    """CutPaste patch heights/widths [n] (long): area ratio in PATCH_AREA, aspect log-uniform in PATCH_ASPECT."""
    area = _uniform(generator, *PATCH_AREA, n, device) * (h * w)
    aspect = torch.exp(_uniform(generator, *(math.log(a) for a in PATCH_ASPECT), n, device))
    ph = torch.sqrt(area * aspect).round().clamp(1, h).long()
    pw = torch.sqrt(area / aspect).round().clamp(1, w).long()
    return ph, pw


class RectangleGenerator(TexturedGenerator):
    """Ablation: 1..3 random axis-aligned rectangles filled with a texture."""

    max_rectangles = 3

    def make_mask(self, n: int, shape: torch.Size, generator: torch.Generator, device: Device) -> Tensor:
        h, w = int(shape[0]), int(shape[1])
        r = self.max_rectangles
        ph, pw = (t.view(n, r) for t in _patch_sizes(generator, n * r, h, w, device))
        y0 = (rand(generator, n, r, device=device) * (h - ph + 1)).long()
        x0 = (rand(generator, n, r, device=device) * (w - pw + 1)).long()
        used = torch.arange(r, device=device) <= randint(generator, 0, r, n, 1, device=device)
        ys = torch.arange(h, device=device).view(1, 1, h, 1)
        xs = torch.arange(w, device=device).view(1, 1, 1, w)

        def inside(lo: Tensor, size: Tensor, coords: Tensor) -> Tensor:
            return (coords >= lo[..., None, None]) & (coords < (lo + size)[..., None, None])

        boxes = inside(y0, ph, ys) & inside(x0, pw, xs) & used[..., None, None]
        return boxes.any(dim=1, keepdim=True)


class CutPasteGenerator(AnomalyGenerator):
    """Ablation (CutPaste): paste a jittered rectangle (or thin rotated scar) of the image elsewhere."""

    def anomalies(self, target: Tensor, pool: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n, c, h, w = target.shape
        dev = target.device
        ph, pw = (t.float() for t in _patch_sizes(generator, n, h, w, dev))
        scar = rand(generator, n, device=dev) < self.settings.scar_prob
        scale = min(h, w) / 256  # CutPaste scar sizes are given for 256 px images
        # A rotated patch needs both sides >= 2 px to be sure to cover a pixel centre.
        ph = torch.where(scar, _uniform(generator, 10, 25, n, dev).mul(scale).round().clamp(2, h), ph)
        pw = torch.where(scar, _uniform(generator, 2, 16, n, dev).mul(scale).round().clamp(2, w), pw)
        angle = torch.where(scar, _uniform(generator, -math.pi / 4, math.pi / 4, n, dev), 0.0)
        cos, sin = torch.cos(angle), torch.sin(angle)

        # Source: axis-aligned, integer corner. Target: centre such that the rotated patch fits.
        src_y = (rand(generator, n, device=dev) * (h - ph + 1)).floor() + ph / 2
        src_x = (rand(generator, n, device=dev) * (w - pw + 1)).floor() + pw / 2
        half_y = (cos.abs() * ph + sin.abs() * pw) / 2
        half_x = (sin.abs() * ph + cos.abs() * pw) / 2
        dst_y = half_y + (rand(generator, n, device=dev) * (h - 2 * half_y + 1).clamp(min=1)).floor()
        span_x = (w - 2 * half_x + 1).clamp(min=1)
        dst_x = half_x + (rand(generator, n, device=dev) * span_x).floor()
        same = ~scar & (dst_y == src_y) & (dst_x == src_x)  # would paste the patch onto itself
        dst_x = torch.where(same, half_x + (dst_x - half_x + (span_x / 2).floor()).remainder(span_x), dst_x)

        # Each target pixel, in patch coordinates (rotated back); inside the patch -> copy from source.
        dy = (torch.arange(h, device=dev) + 0.5).view(1, h, 1) - dst_y.view(n, 1, 1)
        dx = (torch.arange(w, device=dev) + 0.5).view(1, 1, w) - dst_x.view(n, 1, 1)
        cos, sin = cos.view(n, 1, 1), sin.view(n, 1, 1)
        qy, qx = cos * dy + sin * dx, cos * dx - sin * dy
        mask = (qy.abs() < ph.view(n, 1, 1) / 2) & (qx.abs() < pw.view(n, 1, 1) / 2)
        sy = (src_y.view(n, 1, 1) + qy).floor().clamp(0, h - 1).long()
        sx = (src_x.view(n, 1, 1) + qx).floor().clamp(0, w - 1).long()
        index = (sy * w + sx).view(n, 1, h * w).expand(n, c, h * w)
        pasted = torch.gather(target.reshape(n, c, h * w), 2, index).view(n, c, h, w)
        return self._jitter(pasted, generator), mask[:, None].to(target.dtype)

    def _jitter(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Brightness, contrast and saturation jitter of strength ``cutpaste_jitter``."""
        j = self.settings.cutpaste_jitter
        if j == 0:
            return x
        n, dev = x.shape[0], x.device

        def factor() -> Tensor:
            return _uniform(generator, 1 - j, 1 + j, n, dev).view(n, 1, 1, 1).to(x.dtype)

        x = x * factor()
        x = torch.lerp(x.mean(dim=(1, 2, 3), keepdim=True), x, factor())
        return torch.lerp(x.mean(dim=1, keepdim=True), x, factor()).clamp_(0, 1)


def make_generator(settings: GeneratorSettings) -> AnomalyGenerator:
    """Build G for ``settings``: the kind's generator with folder or built-in textures."""
    settings.validate()
    if settings.kind == "cutpaste":
        return CutPasteGenerator(settings)
    textures: TextureSource
    textures = FolderTextures(settings.texture_dir) if settings.texture_dir is not None else BatchTextures()
    if settings.kind == "rectangle":
        return RectangleGenerator(settings, textures)
    return PerlinGenerator(settings, textures)
