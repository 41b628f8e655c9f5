"""Stage 2's memory losses and adaptor head, and the out-of-fold scores that calibrate the threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.adaptor import PatchAdaptor, flag_patches, train_adaptor
from components.config import BankConfig, TocoadConfig
from components.losses import compactness_loss, margin_loss, nearest_memory_distance
from components.out_of_fold import assign_folds, out_of_fold_scores


def _step(x: torch.Tensor, loss: torch.Tensor, lr: float = 0.1) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, x)
    return (x - lr * grad).detach()


def test_nearest_memory_distance_skips_the_patch_own_image():
    memory = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    feats = torch.tensor([[0.0, 0.0]])
    assert nearest_memory_distance(feats, memory).item() == pytest.approx(1e-6, abs=1e-5)
    d = nearest_memory_distance(feats, memory, torch.tensor([7]), torch.tensor([7, 8]))
    assert d.item() == pytest.approx(5.0)


def test_compactness_pulls_normal_patches_to_their_nearest_memory_patch():
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(20, 8, generator=gen)
    x = torch.randn(50, 8, generator=gen).requires_grad_(True)
    before = nearest_memory_distance(x, memory)
    after = nearest_memory_distance(_step(x, compactness_loss(before) * len(x)), memory)
    assert torch.all(after < before.detach())


def test_margin_pushes_only_flagged_patches_inside_the_margin():
    memory = torch.zeros(1, 2)
    x = torch.tensor([[0.5, 0.0], [0.0, 1.0], [5.0, 0.0]], requires_grad=True)  # distances 0.5, 1, 5
    d = nearest_memory_distance(x, memory)
    moved = _step(x, margin_loss(d, torch.tensor(1.0), 1.0) * len(x))
    after = nearest_memory_distance(moved, memory)
    assert after[0] > 0.5 and after[1] > 1.0  # inside level + margin = 2: pushed out
    assert after[2].item() == pytest.approx(5.0)  # already beyond: untouched


def test_adaptor_starts_as_identity_and_flags_follow_the_mask():
    emb = torch.randn(2, 6, 4, 4)
    assert torch.equal(PatchAdaptor(6)(emb), emb) and torch.equal(PatchAdaptor(6, linear=True)(emb), emb)
    linear = PatchAdaptor(6, linear=True)
    torch.nn.init.normal_(linear.fc2.weight)
    assert torch.allclose(linear(2 * emb), 2 * linear(emb) - linear.fc2.bias.view(1, -1, 1, 1), atol=1e-5)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :8] = 1
    flags = flag_patches(mask, (4, 4))
    assert flags.shape == (1, 4, 4) and flags[0, :2, :2].all() and flags.sum() == 4


def _toy(seed: int = 0):
    """Normal patches around a few prototypes, noisy in a nuisance direction; synthetic anomalies shifted along
    a defect direction by about the nuisance noise, so frozen distances barely tell them apart."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = 8, 6, 4, 4
    protos = torch.randn(3, c, generator=gen)
    pick = torch.randint(3, (n, h, w), generator=gen)
    normal = protos[pick] + 0.3 * torch.randn(n, h, w, c, generator=gen) * torch.tensor([1.0, 1, 1, 1, 1, 0])
    synthetic = normal.clone()
    flags = torch.zeros(n, h, w, dtype=torch.bool)
    flags[:, 1:3, 1:3] = True
    synthetic[flags] += torch.tensor([0.0, 0, 0, 0, 0, 0.6])
    return normal.permute(0, 3, 1, 2).contiguous(), synthetic.permute(0, 3, 1, 2).contiguous(), flags


def _separation(head, normal, synthetic, flags) -> float:
    """Mean flagged-patch distance over the 0.99 quantile of normal leave-own-image-out distances."""
    with torch.no_grad():
        hn, hs = head(normal), head(synthetic)
    n, c, h, w = normal.shape
    flat = hn.permute(0, 2, 3, 1).reshape(-1, c)
    ids = torch.arange(n).repeat_interleave(h * w)
    d_normal = nearest_memory_distance(flat, flat, ids, ids)
    d_anom = nearest_memory_distance(hs.permute(0, 2, 3, 1)[flags], flat)
    return float(d_anom.mean() / torch.quantile(d_normal, 0.99))


def test_adaptor_separates_flagged_patches_from_normal_ones():
    normal, synthetic, flags = _toy()
    cfg = TocoadConfig().with_overrides(
        [
            "contrastive.mode=adaptor",
            "contrastive.adaptor_epochs=60",
            "contrastive.batch_size=4",
            "bank.coreset_ratio=0.5",
            "runtime.progress=false",
        ]  # fmt: skip
    )
    head, history = train_adaptor(cfg, normal, synthetic, flags, progress=False)
    before = _separation(torch.nn.Identity(), normal, synthetic, flags)
    after = _separation(head, normal, synthetic, flags)
    assert after > 1.3 * before, (before, after)
    assert history[-1]["margin"] < history[0]["margin"]
    assert not any(p.requires_grad for p in head.parameters())


def test_folds_are_balanced_and_seeded():
    folds = assign_folds(23, 5, seed=1)
    assert sorted(np.bincount(folds)) == [4, 4, 5, 5, 5]
    assert np.array_equal(folds, assign_folds(23, 5, seed=1))
    assert not np.array_equal(folds, assign_folds(23, 5, seed=2))
    assert np.bincount(assign_folds(3, 5, seed=0)).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(1, 5, seed=0)


def test_out_of_fold_banks_keep_the_deployed_size_and_never_see_their_own_image():
    rng = np.random.default_rng(0)
    grid, n = (2, 2), 6
    # every image is its own far-away cluster: in its own bank it would score ~0, out of fold it scores far
    centres = rng.normal(0, 10, (n, 1, 4))
    emb = (centres + rng.normal(0, 0.01, (n, 4, 4))).reshape(-1, 4).astype(np.float32)
    bank = BankConfig(coreset_ratio=1.0, index="flat")
    out = out_of_fold_scores(emb, grid, bank, folds=3, seed=0, bank_rows=np.arange(len(emb)), progress=False)
    assert out.scores.shape == (n,) and out.patch.shape == (n, *grid)
    assert out.scores.min() > 1.0
    assert np.allclose(out.scores, out.patch.reshape(n, -1).max(axis=1))
    assert out.extra_patch is None
    # extra images scored against their source's fold bank: a copy of image j scores exactly as j out of fold
    source = np.array([4, 0, 2])
    extra = emb.reshape(n, -1, 4)[source].reshape(-1, 4)
    withx = out_of_fold_scores(emb, grid, bank, 3, 0, np.arange(len(emb)), False, extra, source)
    assert np.allclose(withx.extra_patch, out.patch[source]) and np.allclose(withx.scores, out.scores)
    # identical images: the other folds hold an exact copy, so every score is ~0
    same = np.tile(emb[:4], (n, 1))
    rows = np.arange(len(same))
    assert out_of_fold_scores(same, grid, bank, 3, 0, rows, progress=False).scores.max() < 1e-2
    with pytest.raises(ValueError, match="do not split"):
        out_of_fold_scores(emb[:-1], grid, bank, folds=3, seed=0, bank_rows=rows, progress=False)


def test_adaptor_stage_saves_reloads_and_calibrates_out_of_fold(serve_data, tmp_path):
    from conftest import TINY

    from components.pipeline import load_artifacts, train

    cfg = TocoadConfig().with_overrides(
        [*TINY, "contrastive.mode=adaptor", "contrastive.adaptor_epochs=2", "calibration.synthetic_images=4"]
    )
    art = train(cfg, serve_data, tmp_path / "b")
    assert (
        art.adaptor is not None and "c" in art.history and (tmp_path / "b" / "adaptor.safetensors").is_file()
    )
    calib = art.metrics["calibration"]
    assert calib["normal_images"] == 30 and calib["folds"] == 5 and calib["synthetic_images"] == 4
    assert calib["method"] == "normal_max"  # 30 images cannot estimate a 1 % quantile
    assert isinstance(calib["atypical_images"], list)
    back = load_artifacts(tmp_path / "b")
    images = torch.rand(2, 3, 64, 64)
    assert np.allclose(art.model().predict(images).scores, back.model().predict(images).scores, rtol=1e-4)
    plain = back.model()
    plain.adaptor = None
    assert not np.allclose(plain.predict(images).scores, back.model().predict(images).scores, rtol=1e-4)


def test_out_of_fold_banks_are_refilled_to_the_deployed_size(monkeypatch):
    import components.out_of_fold as oof

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(10 * 4, 3)).astype(np.float32)  # 10 images of 2 x 2 patches
    bank = BankConfig(coreset_ratio=0.25, index="flat")
    rows = oof.coreset_indices(emb, bank, seed=0, progress=False)
    sizes = []
    real = oof.build_index
    monkeypatch.setattr(oof, "build_index", lambda b, kind: sizes.append(len(b)) or real(b, kind=kind))
    oof.out_of_fold_scores(emb, (2, 2), bank, folds=5, seed=0, bank_rows=rows, progress=False)
    assert sizes == [len(rows)] * 5  # not 80 % of it
