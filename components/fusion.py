"""D's anomaly map as a second score, fused with the nearest-neighbour map (ToCoAD's stage 1 at test time).

Both maps live on the patch grid. Each is put on a common scale with its own normal patches (``(x - median) /
(q99 - median)``): the nearest-neighbour distances of the training images scored out of fold, and D's probability
on the training images. The fused patch score is ``(1 - w) * knn + w * d``; the image score is its maximum and
the anomaly map its upsampled, blurred version, as for the plain bank.

The weight ``w`` is chosen on synthetic anomalies, never on test labels, and from a generator family that D did
not train on (``fusion.validation_kind``, cutpaste by default while D learns from Perlin blends): D recognises
its own training anomalies almost perfectly, so validating on them would always hand it the whole weight. The
chosen ``w`` maximises the mean of image AUROC (normal images against synthetic ones) and patch AUROC (masked
synthetic patches against every other patch); a weight above 0 must beat ``w = 0`` by ``fusion.min_gain``, so D
is fused only where it adds something on anomalies it has not seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from components.metrics import image_auroc, pixel_auroc

WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class Scale:
    """Robust affine scale of one map: ``(x - center) / spread``."""

    center: float
    spread: float

    @classmethod
    def of_normal(cls, values: np.ndarray, quantile: float = 0.99) -> Scale:
        """Median and (quantile - median) of normal patch values (spread floored at 1e-6)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            raise ValueError("no normal patch values to scale by")
        center = float(np.median(v))
        return cls(center, max(float(np.quantile(v, quantile)) - center, 1e-6))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.center) / self.spread).astype(np.float32)


@dataclass(frozen=True)
class Fusion:
    """The fused score's weight of D and the two scales, with the validation behind the weight."""

    weight: float
    knn: Scale
    d: Scale
    validation: dict[str, float] = field(
        default_factory=dict
    )  # weight -> objective on held-out-family anomalies

    def __call__(self, knn_patch: np.ndarray, d_patch: np.ndarray) -> np.ndarray:
        """Fused patch scores ``[B, h, w]`` from nearest-neighbour distances and D's patch probabilities."""
        if self.weight == 0:
            return self.knn(knn_patch)
        return (1.0 - self.weight) * self.knn(knn_patch) + self.weight * self.d(d_patch)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        return cls(float(d["weight"]), Scale(**d["knn"]), Scale(**d["d"]), dict(d.get("validation", {})))


def d_patch_map(disc: torch.nn.Module, images: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """D's anomaly probability averaged over each patch of ``grid``: ``[B, h, w]`` float32."""
    with torch.inference_mode():
        prob = torch.sigmoid(disc(images).float())
        return F.adaptive_avg_pool2d(prob, grid)[:, 0].cpu().numpy().astype(np.float32)


def patch_labels(masks: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Patches ``[B, h, w]`` over half covered by the pixel masks ``[B, 1, H, W]`` (or ``[B, H, W]``)."""
    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    return (F.adaptive_avg_pool2d(m, grid)[:, 0] > 0.5).numpy()


def objective(normal: np.ndarray, synthetic: np.ndarray, labels: np.ndarray) -> float:
    """Mean of image AUROC (max patch, normal vs synthetic images) and patch AUROC (labelled synthetic patches
    vs all other patches), in [0, 1]. ``normal`` ``[N, h, w]``, ``synthetic`` and ``labels`` ``[M, h, w]``."""
    img = image_auroc(
        np.r_[np.zeros(len(normal)), np.ones(len(synthetic))],
        np.r_[normal.reshape(len(normal), -1).max(1), synthetic.reshape(len(synthetic), -1).max(1)],
    )
    masks = np.concatenate([np.zeros(normal.shape, dtype=bool), labels])
    pix = pixel_auroc(masks, np.concatenate([normal, synthetic]))
    return 0.5 * (img + pix)


def choose_fusion(
    knn_normal: np.ndarray,
    d_normal: np.ndarray,
    knn_synthetic: np.ndarray,
    d_synthetic: np.ndarray,
    labels: np.ndarray,
    min_gain: float,
    weights: tuple[float, ...] = WEIGHTS,
) -> Fusion:
    """The weight of D that scores synthetic anomalies best (module doc); 0 unless it beats 0 by ``min_gain``."""
    if not labels.any():
        raise ValueError("the synthetic anomalies cover no patch; cannot validate the fusion")
    base = Fusion(0.0, Scale.of_normal(knn_normal), Scale.of_normal(d_normal))
    scored = {}
    for w in weights:
        f = Fusion(w, base.knn, base.d)
        scored[str(w)] = round(objective(f(knn_normal, d_normal), f(knn_synthetic, d_synthetic), labels), 4)
    best = max(weights, key=lambda w: (scored[str(w)], -w))
    if scored[str(best)] < scored[str(0.0)] + min_gain:
        best = 0.0
    return Fusion(best, base.knn, base.d, scored)
