"""D's anomaly map as a second score, fused with the nearest-neighbour map (ToCoAD's stage 1 at test time).

Both maps live on the patch grid. Each is put on a common scale with its own normal patches (``(x - median) /
(q99 - median)``): the nearest-neighbour distances of the training images scored out of fold, and D's probability
on held-out normal images. The fused patch score is ``(1 - w) * knn + w * d``; the image score is its maximum and
the anomaly map its upsampled, blurred version, as for the plain bank, each with its own ``w``.

The weights are chosen on synthetic anomalies, never on test labels: anomalies of a generator family that D did
not train on (cutpaste, while D learns from Perlin blends; D recognises its own family almost perfectly), made
from normal images that D did not train on and that the kNN bank does not hold (out of fold). D's normal scale
comes from those held-out images too: on its own training images D is quieter than on new ones. The image
score's weight maximises image AUROC (normal images against synthetic ones), the map's weight patch AUROC
(masked synthetic patches against every other patch); the two differ where D localises well but also fires on
some normal parts. A weight above 0 must beat 0 by ``min_gain``, so D is fused only where it adds something.
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
    """Weights of D in the image score and in the anomaly map, the two scales, and the validation behind them."""

    image_weight: float
    pixel_weight: float
    knn: Scale
    d: Scale
    validation: dict[str, dict[str, float]] = field(default_factory=dict)  # level -> weight -> AUROC

    def patch(self, knn_patch: np.ndarray, d_patch: np.ndarray, weight: float) -> np.ndarray:
        """Fused patch scores ``[B, h, w]``: ``(1 - weight) * knn + weight * d``, each on its normal scale."""
        if weight == 0:
            return self.knn(knn_patch)
        return (1.0 - weight) * self.knn(knn_patch) + weight * self.d(d_patch)

    def image_scores(self, knn_patch: np.ndarray, d_patch: np.ndarray) -> np.ndarray:
        """Image scores ``[B]``: the largest fused patch score at the image weight."""
        fused = self.patch(knn_patch, d_patch, self.image_weight)
        return fused.reshape(len(fused), -1).max(axis=1).astype(np.float64)

    def map_patches(self, knn_patch: np.ndarray, d_patch: np.ndarray) -> np.ndarray:
        """Fused patch scores at the pixel weight, for the anomaly map."""
        return self.patch(knn_patch, d_patch, self.pixel_weight)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        return cls(
            float(d["image_weight"]),
            float(d["pixel_weight"]),
            Scale(**d["knn"]),
            Scale(**d["d"]),
            {k: dict(v) for k, v in d.get("validation", {}).items()},
        )


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


def validation_aurocs(normal: np.ndarray, synthetic: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(image AUROC, patch AUROC) in [0, 1] of fused patch scores: normal ``[N, h, w]`` against synthetic
    ``[M, h, w]`` images by their largest patch, and labelled synthetic patches against every other patch."""
    img = image_auroc(
        np.r_[np.zeros(len(normal)), np.ones(len(synthetic))],
        np.r_[normal.reshape(len(normal), -1).max(1), synthetic.reshape(len(synthetic), -1).max(1)],
    )
    masks = np.concatenate([np.zeros(normal.shape, dtype=bool), labels])
    return img, pixel_auroc(masks, np.concatenate([normal, synthetic]))


def _best(scored: dict[str, float], min_gain: float) -> float:
    """The weight with the highest AUROC (the smaller on ties); 0 unless it beats 0 by ``min_gain``."""
    best = max(scored, key=lambda w: (scored[w], -float(w)))
    return float(best) if scored[best] >= scored["0.0"] + min_gain else 0.0


def choose_fusion(
    knn_normal: np.ndarray,
    d_normal: np.ndarray,
    knn_synthetic: np.ndarray,
    d_synthetic: np.ndarray,
    labels: np.ndarray,
    min_gain: float,
    weights: tuple[float, ...] = WEIGHTS,
) -> Fusion:
    """Weights of D for the image score and for the map that score the synthetic anomalies best (module doc).

    Inputs are patch maps of normal images and of synthetic anomalies made from them, none of which D trained on
    and none of which the kNN bank held (out of fold)."""
    if not labels.any():
        raise ValueError("the synthetic anomalies cover no patch; cannot validate the fusion")
    base = Fusion(0.0, 0.0, Scale.of_normal(knn_normal), Scale.of_normal(d_normal))
    image, pixel = {}, {}
    for w in weights:
        key = str(float(w))
        normal, synthetic = base.patch(knn_normal, d_normal, w), base.patch(knn_synthetic, d_synthetic, w)
        image[key], pixel[key] = (round(v, 4) for v in validation_aurocs(normal, synthetic, labels))
    return Fusion(
        _best(image, min_gain), _best(pixel, min_gain), base.knn, base.d, {"image": image, "pixel": pixel}
    )
