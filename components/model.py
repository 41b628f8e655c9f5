"""The deployable detector: F plus the memory bank's faiss index, giving image scores and anomaly maps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from components.backbone import FeatureExtractor
from components.calibration import Calibration
from components.config import TocoadConfig
from components.nn_index import build_index
from components.patch_features import embed_images, flatten_patches
from components.scoring import anomaly_map, image_scores, patch_distances


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
        adaptor: torch.nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.extractor = extractor.to(self.device).eval()
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.index = index if index is not None else build_index(self.bank, kind=cfg.bank.index)
        self.calibration = calibration
        self.adaptor = None if adaptor is None else adaptor.to(self.device).eval()

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``[B, C, h, w]`` of a [0, 1] RGB batch at the model's image size."""
        b = self.cfg.bank
        return embed_images(
            self.extractor, images.to(self.device), b.aggregation, b.feature_dim, self.adaptor, b.border
        )

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, with_maps: bool = True) -> Prediction:
        """Image scores (max patch distance, optionally density-reweighted) and blurred anomaly maps."""
        emb = self.embed(images)
        queries = flatten_patches(emb).float().cpu().numpy()
        patch_np = patch_distances(self.index, queries, tuple(emb.shape[-2:]))
        scores = image_scores(patch_np, queries, self.bank, self.index, self.cfg.bank.reweight)
        patch = torch.from_numpy(patch_np)
        maps = None
        if with_maps:
            maps = anomaly_map(patch, tuple(images.shape[-2:]), self.cfg.bank.blur_sigma).numpy()
        return Prediction(scores, maps, patch_np)
