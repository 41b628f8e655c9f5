"""The scorer end to end on a real backbone: a float16-stored bank scores like the float32 one."""

from __future__ import annotations

import numpy as np
import torch

from components.backbone import create_feature_extractor
from components.config import TocoadConfig
from components.model import AnomalyModel
from components.patch_features import flatten_patches


def test_float16_bank_scores_within_tolerance_of_float32():
    """Bundles store the bank as float16; scores from it must match the float32 bank's closely."""
    torch.manual_seed(0)
    cfg = TocoadConfig().with_overrides(["data.image_size=64", "bank.index=flat"])
    b = cfg.backbone
    extractor = create_feature_extractor(b.name, b.weights, b.layers, b.mean, b.std)
    train = torch.rand(6, 3, 64, 64)
    probe = AnomalyModel.__new__(AnomalyModel)  # only to reach embed() before a bank exists
    probe.cfg, probe.device, probe.extractor = cfg, torch.device("cpu"), extractor.eval()
    bank32 = flatten_patches(probe.embed(train)).float().numpy()
    bank16 = bank32.astype(np.float16).astype(np.float32)
    assert np.abs(bank16 - bank32).max() > 0  # the rounding is real
    images = torch.rand(4, 3, 64, 64)
    full = AnomalyModel(cfg, extractor, bank32).predict(images)
    half = AnomalyModel(cfg, extractor, bank16).predict(images)
    np.testing.assert_allclose(half.scores, full.scores, rtol=1e-4)  # fp16: ~4e-5; bf16 would fail (~2e-4)
    np.testing.assert_allclose(half.maps, full.maps, rtol=1e-4, atol=1e-4 * float(full.maps.max()))
