"""Patch features: F's two levels turned into one locally aware embedding per patch (PatchCore).

Each level is averaged over a ``k x k`` neighbourhood (so a patch sees its surroundings), the coarser level is
upsampled bilinearly to the finer grid, and the levels are concatenated. At the map's border the average either
averages only the neighbours inside the map (``border="valid"``, the default) or counts the zero padding
(``"zeros"``, PatchCore's and anomalib's ``AvgPool2d``: border patches damped towards 0 alike in bank and test).
Under the seed protocol (bench/RESULTS.md section 8) zeros gave better maps on all four dev sets (pixel AUROC
+0.07 to +0.71, AUPRO up to +4.7) but cost tire 4.7 points of image AUROC, so it is a setting, not the default.
An optional projection averages groups of
channels down to ``feature_dim`` (PatchCore's adaptive pooling), which keeps the bank small for wide backbones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BORDERS = ("zeros", "valid")


def aggregate(level: torch.Tensor, kernel: int, border: str = "valid") -> torch.Tensor:
    """Average each feature over its ``kernel x kernel`` neighbourhood, keeping the grid size; ``border`` says
    whether the zero padding counts at the map's edge (module doc)."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if kernel <= 1:
        return level
    return F.avg_pool2d(level, kernel, stride=1, padding=kernel // 2, count_include_pad=border == "zeros")


def patch_embedding(
    levels: list[torch.Tensor], kernel: int = 3, feature_dim: int | None = None, border: str = "valid"
) -> torch.Tensor:
    """Embed two (or more) feature levels as one map ``[B, C, h, w]`` on the finest level's grid."""
    size = levels[0].shape[-2:]
    parts = []
    for level in levels:
        level = aggregate(level, kernel, border)
        if level.shape[-2:] != size:
            level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        parts.append(level)
    emb = torch.cat(parts, dim=1)
    if feature_dim is not None and feature_dim != emb.shape[1]:
        b, c, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(-1, 1, c)
        emb = F.adaptive_avg_pool1d(flat, feature_dim).reshape(b, h, w, feature_dim).permute(0, 3, 1, 2)
    return emb


CPU_CHUNK = 1  # images per backbone call on CPU; see embed_images


def embed_images(
    extractor,
    images: torch.Tensor,
    kernel: int = 3,
    feature_dim: int | None = None,
    adaptor=None,
    border: str = "valid",
) -> torch.Tensor:
    """:func:`patch_embedding` of ``extractor(images)`` ``[B, C, h, w]``, through ``adaptor`` (stage 2's head)
    when given; on CPU one image per backbone call.

    On CPU a batch of 8 in one call took 1.9x longer per image than single images (``bench/backbone_batch.py``,
    bench/RESULTS.md 7.2), so CPU batches run as a loop of CPU_CHUNK images; GPUs take the batch.
    """
    if images.device.type != "cpu" or len(images) <= CPU_CHUNK:
        emb = patch_embedding(extractor(images), kernel, feature_dim, border)
    else:
        parts = [images[i : i + CPU_CHUNK] for i in range(0, len(images), CPU_CHUNK)]
        emb = torch.cat([patch_embedding(extractor(x), kernel, feature_dim, border) for x in parts])
    return emb if adaptor is None else adaptor(emb)


def flatten_patches(emb: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B * h * w, C]`` (row-major over images, then rows, then columns)."""
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
