"""The training-data profile a deployed model compares live input against to detect drift."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

QUANTILES = np.linspace(0.0, 1.0, 21)
_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def image_statistics(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image brightness (mean grey), contrast (grey std) and sharpness (variance of the Laplacian).

    ``images`` is a [0, 1] RGB batch ``[B, 3, H, W]``; each statistic comes back as a ``[B]`` array.
    """
    gray = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1).float()
    lap = F.conv2d(gray, _LAPLACE.to(gray.device))
    return {
        "brightness": gray.mean(dim=(1, 2, 3)).cpu().numpy(),
        "contrast": gray.std(dim=(1, 2, 3)).cpu().numpy(),
        "sharpness": lap.var(dim=(1, 2, 3)).cpu().numpy(),
    }


def quantiles(values: np.ndarray) -> list[float]:
    """The 0, 5, ..., 100th percentiles of ``values`` (what drift checks bin live data against)."""
    return [float(q) for q in np.quantile(np.asarray(values, dtype=np.float64), QUANTILES)]


def build_profile(
    normal_scores: np.ndarray, nn_distances: np.ndarray, stats: dict[str, np.ndarray]
) -> dict[str, object]:
    """Quantiles of held-out normal image scores, of their patch nearest-neighbour distances, and of image stats."""
    nn = np.asarray(nn_distances, dtype=np.float64).ravel()
    return {
        "quantile_levels": [float(q) for q in QUANTILES],
        "normal_scores": quantiles(normal_scores),
        "nn_distances": quantiles(nn),
        "nn_distance_p99": float(np.quantile(nn, 0.99)),
        "image_stats": {name: quantiles(values) for name, values in stats.items()},
        "n_images": int(len(normal_scores)),
    }
