"""Loss functions of both training stages. Each is a plain function of tensors.

Each loss runs in float32, also when called inside an autocast region: its floating-point inputs are cast up and
autocast is off inside, so exponentials, sigmoids, sums over a whole batch and cosines never run in bf16/fp16.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

_Fn = TypeVar("_Fn", bound=Callable)


def _fp32(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast off and its floating-point tensor arguments cast to float32."""

    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


@_fp32
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al.) on per-pixel logits; ``target`` holds 0/1 of the same shape."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)  # probability given to the true class
    return ((1 - p_t) ** gamma * bce).mean()


@_fp32
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch; rewards getting the regions' extent right.

    Pooled over the batch (not per image) so that anomaly-free images, which G makes half the time, do not
    each demand an exactly empty prediction.
    """
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    return 1 - (2 * inter + eps) / (prob.sum() + target.sum() + eps)


@_fp32
def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) on dense maps ``[B, C, h, w]``: minus the mean cosine, with stop-gradient on ``z``."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric dense SimSiam loss; -1 when each view's prediction matches the other view's projection."""
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


@_fp32
def distill_loss(feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The forgetting guard: mean ``1 - cos`` between dense maps ``[B, C, h, w]`` (no gradient to ``target``)."""
    return (1 - F.cosine_similarity(feat, target.detach(), dim=1)).mean()


@_fp32
def guide_loss(
    feat: torch.Tensor, anchor: torch.Tensor, anomalous: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative guide: push anomalous locations away from the clean anchor, keep normal ones close.

    ``feat`` are F's patch embeddings of a synthetic-anomaly image, ``anchor`` those of the clean image at the same
    locations (no gradient), ``anomalous`` a ``[B, 1, h, w]`` bool map of where D sees an anomaly. Anomalous
    locations pay ``relu(cos - margin)``; normal ones pay ``1 - cos``. Returns (push term, pull term).
    """
    cos = F.cosine_similarity(feat, anchor.detach(), dim=1).unsqueeze(1)
    anomalous = anomalous.to(cos.dtype)
    normal = 1 - anomalous
    push = (F.relu(cos - margin) * anomalous).sum() / anomalous.sum().clamp(min=1)
    pull = ((1 - cos) * normal).sum() / normal.sum().clamp(min=1)
    return push, pull


@_fp32
def feature_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised dense features; ~1/sqrt(C) when healthy, 0 when collapsed."""
    flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return flat.std(dim=0).mean()


@_fp32
def nearest_memory_distance(
    feats: torch.Tensor,
    memory: torch.Tensor,
    feat_ids: torch.Tensor | None = None,
    memory_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euclidean distance ``[P]`` from each patch ``[P, C]`` to its nearest memory item ``[M, C]``.

    With ``feat_ids`` ``[P]`` and ``memory_ids`` ``[M]`` (the image each came from), items of a patch's own image
    are skipped, as the scorer never sees a test image in its bank. Differentiable in both arguments; the square
    root is taken of a clamped square so that a zero distance has a finite gradient.
    """
    sq = (feats * feats).sum(1, keepdim=True) + (memory * memory).sum(1) - 2.0 * feats @ memory.t()
    if feat_ids is not None and memory_ids is not None:
        sq = sq.masked_fill(feat_ids[:, None] == memory_ids[None, :], float("inf"))
    return sq.min(dim=1).values.clamp(min=1e-12).sqrt()


def compactness_loss(distances: torch.Tensor, spread: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Pull normal patches towards the normal memory: their mean nearest-memory distance over ``spread``, the
    memory's own typical distance between items (with gradient), so that shrinking the whole space gains nothing."""
    return distances.mean() / spread


def margin_loss(distances: torch.Tensor, normal_level: torch.Tensor | float, margin: float) -> torch.Tensor:
    """Push anomalous patches out: mean ``relu(1 + margin - d / normal_level)`` over their nearest-memory
    distances ``d``, ``normal_level`` being a high quantile of the normal patches' distances (with gradient, so
    the normal tail is pulled in as the anomalies are pushed out). Scale-free: zooming the space changes nothing."""
    return F.relu(1.0 + margin - distances / normal_level).mean()
