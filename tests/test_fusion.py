"""components/fusion.py: D's map fused with the kNN map, its weight chosen on held-out-family anomalies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.fusion import Fusion, Scale, choose_fusion, d_patch_map, patch_labels


def _maps(seed: int, n: int = 40, grid: int = 8):
    """kNN and D patch maps of normal images and of synthetic ones whose labelled patches D sees but kNN barely."""
    rng = np.random.default_rng(seed)
    knn_normal = rng.normal(10.0, 1.0, (n, grid, grid)).astype(np.float32)
    d_normal = rng.uniform(0.0, 0.1, (n, grid, grid)).astype(np.float32)
    labels = np.zeros((n, grid, grid), dtype=bool)
    labels[:, 2:4, 2:4] = True
    knn_synth = rng.normal(10.0, 1.0, (n, grid, grid)).astype(np.float32) + 0.5 * labels
    d_synth = rng.uniform(0.0, 0.1, (n, grid, grid)).astype(np.float32) + 0.8 * labels
    return knn_normal, d_normal, knn_synth, d_synth, labels


def test_scale_puts_normal_median_at_zero_and_q99_at_one():
    values = np.arange(1001, dtype=np.float64)
    s = Scale.of_normal(values)
    assert s.center == 500.0 and s.spread == pytest.approx(490.0)
    assert s(np.array([500.0, 990.0])) == pytest.approx([0.0, 1.0])
    assert Scale.of_normal(np.ones(10)).spread == 1e-6  # a constant map does not divide by zero
    with pytest.raises(ValueError, match="no normal"):
        Scale.of_normal(np.array([]))


def test_choose_fusion_gives_d_weight_where_d_sees_the_anomalies():
    knn_n, d_n, knn_s, d_s, labels = _maps(0)
    fusion = choose_fusion(knn_n, d_n, knn_s, d_s, labels, min_gain=0.005)
    assert fusion.pixel_weight > 0
    pixel = fusion.validation["pixel"]
    assert pixel[str(fusion.pixel_weight)] >= pixel["0.0"] + 0.005


def test_choose_fusion_weighs_image_and_map_apart():
    """D localises the anomalies but also fires on one patch of some normal images: the map takes D, the image
    score (its maximum over patches) must not."""
    knn_n, d_n, knn_s, d_s, labels = _maps(3)
    d_n[::2, 7, 7] = 1.0  # half the normal images carry one patch where D fires hard
    knn_s[:, 1:5, 1:5] += 4.0  # kNN tells synthetic images from normal ones, but blurs past the anomaly
    fusion = choose_fusion(knn_n, d_n, knn_s, d_s, labels, min_gain=0.005)
    assert fusion.pixel_weight > 0 and fusion.image_weight == 0.0
    assert np.allclose(fusion.image_scores(knn_s, d_s), fusion.knn(knn_s).reshape(len(knn_s), -1).max(1))


def test_choose_fusion_keeps_knn_alone_where_d_is_noise():
    knn_n, d_n, knn_s, _, labels = _maps(1)
    # D's map of the synthetic images is drawn like that of normal images: it carries no information
    d_noise = np.random.default_rng(2).uniform(0.0, 0.1, knn_s.shape).astype(np.float32)
    knn_s = knn_s + 3.0 * labels  # kNN separates them by itself
    fusion = choose_fusion(knn_n, d_n, knn_s, d_noise, labels, min_gain=0.005)
    assert fusion.image_weight == 0.0 and fusion.pixel_weight == 0.0
    assert np.allclose(fusion.map_patches(knn_s, d_noise), fusion.knn(knn_s))  # w = 0: D's map does not enter
    with pytest.raises(ValueError, match="cover no patch"):
        choose_fusion(knn_n, d_n, knn_s, d_noise, np.zeros_like(labels), min_gain=0.005)


def test_fusion_round_trips_and_mixes_the_scaled_maps():
    f = Fusion(0.0, 0.3, Scale(1.0, 2.0), Scale(0.1, 0.5), {"pixel": {"0.0": 0.9}})
    assert Fusion.from_dict(f.to_dict()) == f
    knn, d = np.full((1, 2, 2), 5.0), np.full((1, 2, 2), 0.6)
    assert f.map_patches(knn, d) == pytest.approx(np.full((1, 2, 2), 0.7 * 2.0 + 0.3 * 1.0))
    assert f.image_scores(knn, d) == pytest.approx([2.0])


def test_d_patch_map_and_patch_labels_pool_to_the_grid():
    class Half(torch.nn.Module):  # logits +inf on the left half of the image, -inf on the right
        def forward(self, x):
            out = torch.full((len(x), 1, *x.shape[-2:]), -30.0)
            out[..., : x.shape[-1] // 2] = 30.0
            return out

    m = d_patch_map(Half(), torch.zeros(2, 3, 32, 32), (4, 4))
    assert m.shape == (2, 4, 4) and np.allclose(m[:, :, :2], 1.0) and np.allclose(m[:, :, 2:], 0.0)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :8, :12] = 1.0  # patch (0, 0) fully covered, (0, 1) half: only more than half counts
    lab = patch_labels(mask, (4, 4))
    assert lab[0, 0, 0] and not lab[0, 0, 1] and lab.sum() == 1
