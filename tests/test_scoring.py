"""Anomaly maps, image scores and PatchCore's density reweighting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from components.nn_index import build_index
from components.scoring import (
    anomaly_map,
    gaussian_blur,
    gaussian_kernel1d,
    image_score,
    reweighted_image_score,
)


def test_map_shape_and_dtype():
    out = anomaly_map(torch.rand(3, 7, 9), (56, 72), sigma=4.0)
    assert out.shape == (3, 56, 72) and out.dtype == torch.float32


def test_hot_patch_gives_a_blob_at_its_place():
    scores = torch.zeros(2, 8, 8)
    scores[0, 2, 5] = 1.0
    scores[1, 6, 1] = 1.0
    out = anomaly_map(scores, (64, 64), sigma=2.0)
    for b, (py, px) in enumerate([(2, 5), (6, 1)]):
        y, x = divmod(int(out[b].argmax()), 64)
        assert abs(y - (py * 8 + 3.5)) <= 1 and abs(x - (px * 8 + 3.5)) <= 1  # the patch's centre pixel
        assert out[b].max() < 1.0 and out[b].min() >= 0.0  # blurred, not clipped
        row = out[b, y]
        assert (row[x:].diff() <= 1e-7).all() and (row[: x + 1].diff() >= -1e-7).all()  # falls off both ways


def test_blur_keeps_constants_and_mass():
    const = torch.full((2, 5, 6), 3.25)
    np.testing.assert_allclose(anomaly_map(const, (40, 48), sigma=4.0).numpy(), 3.25, rtol=1e-6)
    np.testing.assert_allclose(gaussian_blur(torch.full((1, 3, 3), 2.0), sigma=4.0).numpy(), 2.0, rtol=1e-6)
    k = gaussian_kernel1d(4.0, 16)
    assert k.shape == (33,) and float(k.sum()) == pytest.approx(1.0) and int(k.argmax()) == 16


def test_blur_matches_direct_convolution_inside():
    x = torch.rand(1, 50, 50, dtype=torch.float64)
    sigma, r = 1.5, 6
    k = gaussian_kernel1d(sigma, r).double()
    direct = torch.einsum("i,j,ij->", k, k, x[0, 20 - r : 21 + r, 30 - r : 31 + r])
    assert float(gaussian_blur(x, sigma)[0, 20, 30]) == pytest.approx(float(direct), rel=1e-6)


def test_sigma_zero_only_upsamples():
    scores = torch.rand(1, 4, 4)
    out = anomaly_map(scores, (4, 4), sigma=0.0)
    np.testing.assert_allclose(out.numpy(), scores.numpy(), rtol=1e-6)


def test_image_score_is_max():
    scores = torch.rand(4, 5, 6)
    np.testing.assert_array_equal(image_score(scores).numpy(), [float(s.max()) for s in scores])
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        image_score(torch.rand(5, 6))


def _reweighted_direct(queries: np.ndarray, bank: np.ndarray, b: int) -> np.ndarray:
    """The paper's formula, written out with brute-force distances."""
    out = []
    for q in queries.astype(np.float64):
        dq = np.linalg.norm(bank - q, axis=1)
        star = int(dq.argmin())
        neigh = np.argsort(np.linalg.norm(bank - bank[star], axis=1), kind="stable")[:b]
        w = 1.0 - np.exp(dq[star]) / np.exp(dq[neigh]).sum()
        out.append(w * dq[star])
    return np.asarray(out)


@pytest.mark.parametrize("b", [2, 3, 5])
def test_reweighting_equals_direct_formula(b):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(30, 4)).astype(np.float32)
    queries = rng.normal(scale=1.5, size=(6, 4)).astype(np.float32)
    got = reweighted_image_score(queries, bank, build_index(bank, "flat"), b=b)
    np.testing.assert_allclose(got, _reweighted_direct(queries, bank, b), rtol=1e-5, atol=1e-6)
    s_star = cdist(queries, bank).min(1)
    assert (got <= s_star + 1e-6).all() and (got >= (1 - 1 / b) * s_star - 1e-6).all()


def test_reweighting_is_stable_for_large_distances():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    got = reweighted_image_score(np.array([[2000.0, 0.0]], dtype=np.float32), bank, b=3)
    # m* = (1, 0) at 1999; its neighbours are itself, (0, 0) and (0, 1), at 1999, 2000 and ~2000.00025
    expected = (1 - 1 / (1 + np.exp(1.0) + np.exp(np.hypot(2000.0, 1.0) - 1999.0))) * 1999.0
    np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_reweighting_b1_and_errors():
    bank = np.eye(3, dtype=np.float32)
    q = np.array([[2.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(reweighted_image_score(q, bank, b=1), [1.0])
    np.testing.assert_allclose(reweighted_image_score(q, bank[:1], b=3), [1.0])  # b capped at the bank size
    with pytest.raises(ValueError, match="b must be"):
        reweighted_image_score(q, bank, b=0)
    with pytest.raises(ValueError, match="bank"):
        reweighted_image_score(q[:, :2], bank)


def test_blur_matrix_equals_padded_separable_conv():
    x = torch.rand(3, 1, 20, 37, dtype=torch.float64)
    sigma = 1.7
    r = round(4 * sigma)
    k = gaussian_kernel1d(sigma, r).double()
    conv = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1)
    )
    conv = torch.nn.functional.conv2d(
        torch.nn.functional.pad(conv, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1)
    )
    np.testing.assert_allclose(
        gaussian_blur(x[:, 0], sigma).numpy(), conv[:, 0].numpy(), rtol=1e-6, atol=1e-7
    )
