"""The deployable detector: F plus the memory bank's faiss index, giving image scores and anomaly maps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from components.backbone import FeatureExtractor
from components.calibration import Calibration
from components.config import TocoadConfig
from components.nn_index import build_index, refine_farthest, search
from components.patch_features import embed_images, flatten_patches
from components.scoring import anomaly_map, reweighted_image_score


@dataclass
class Prediction:
    """Raw image scores ``[B]``, anomaly maps ``[B, H, W]`` (None when not asked for) and patch distances."""

    scores: np.ndarray
    maps: np.ndarray | None
    patch_scores: np.ndarray  # [B, h, w] nearest-neighbour distances


class AnomalyModel:
    """Scores images by each patch's distance to its nearest neighbour in the memory bank (PatchCore)."""

    def __init__(
        self,
        cfg: TocoadConfig,
        extractor: FeatureExtractor,
        bank: np.ndarray,
        index=None,
        calibration: Calibration | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.extractor = extractor.to(self.device).eval()
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.index = index if index is not None else build_index(self.bank, kind=cfg.bank.index)
        self.calibration = calibration

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``[B, C, h, w]`` of a [0, 1] RGB batch at the model's image size."""
        return embed_images(
            self.extractor, images.to(self.device), self.cfg.bank.aggregation, self.cfg.bank.feature_dim
        )

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, with_maps: bool = True) -> Prediction:
        """Image scores (max patch distance, optionally density-reweighted) and blurred anomaly maps."""
        emb = self.embed(images)
        b, _, h, w = emb.shape
        queries = flatten_patches(emb).float().cpu().numpy()
        dist, _ = search(self.index, queries, k=1)
        nearest = refine_farthest(self.index, queries, dist[:, 0], h * w)  # no-op for exact indexes
        patch = torch.from_numpy(nearest.reshape(b, h, w).astype(np.float32))
        if self.cfg.bank.reweight:
            top = patch.view(b, -1).argmax(dim=1).numpy()
            worst = queries.reshape(b, h * w, -1)[np.arange(b), top]
            scores = reweighted_image_score(worst, self.bank, self.index)
        else:
            scores = patch.view(b, -1).amax(dim=1).numpy()
        maps = None
        if with_maps:
            maps = anomaly_map(patch, tuple(images.shape[-2:]), self.cfg.bank.blur_sigma).numpy()
        return Prediction(np.asarray(scores, dtype=np.float64), maps, patch.numpy())
