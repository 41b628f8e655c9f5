"""The scorer end to end on a real backbone: a float16-stored bank scores like the float32 one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.backbone import create_feature_extractor
from components.config import TocoadConfig
from components.model import AnomalyModel
from components.patch_features import embed_images, flatten_patches


def test_float16_bank_scores_within_tolerance_of_float32():
    """Bundles store the bank as float16; scores from it must match the float32 bank's closely."""
    torch.manual_seed(0)
    cfg = TocoadConfig().with_overrides(["data.image_size=64", "bank.index=flat"])
    b = cfg.backbone
    extractor = create_feature_extractor(b.name, b.weights, b.layers, b.mean, b.std)
    train = torch.rand(6, 3, 64, 64)
    with torch.inference_mode():
        bank32 = flatten_patches(embed_images(extractor.eval(), train, cfg.bank.aggregation)).float().numpy()
    bank16 = bank32.astype(np.float16).astype(np.float32)
    assert np.abs(bank16 - bank32).max() > 0  # the rounding is real
    images = torch.rand(4, 3, 64, 64)
    full = AnomalyModel(cfg, extractor, bank32).predict(images)
    half = AnomalyModel(cfg, extractor, bank16).predict(images)
    np.testing.assert_allclose(half.scores, full.scores, rtol=1e-4)  # fp16: ~4e-5; bf16 would fail (~2e-4)
    np.testing.assert_allclose(half.maps, full.maps, rtol=1e-4, atol=1e-4 * float(full.maps.max()))


def test_streamed_extraction_fills_one_array_like_concatenation():
    """A sized loader is written into one preallocated array; an unsized one is collected; both agree."""
    from torch.utils.data import DataLoader, TensorDataset

    from components.memory_bank import extract_embeddings

    cfg = TocoadConfig().with_overrides(["data.image_size=64"])
    b = cfg.backbone
    extractor = create_feature_extractor(b.name, b.weights, b.layers, b.mean, b.std)
    images = torch.rand(5, 3, 64, 64)

    class Dicts(TensorDataset):
        def __getitem__(self, i):
            return {"image": super().__getitem__(i)[0]}

    sized = DataLoader(Dicts(images), batch_size=2)  # 2 + 2 + 1 images: a short last batch
    unsized = ({"image": images[i : i + 2]} for i in range(0, 5, 2))
    a, grid = extract_embeddings(extractor, sized, cfg.bank, torch.device("cpu"), progress=False)
    b_, grid_b = extract_embeddings(extractor, unsized, cfg.bank, torch.device("cpu"), progress=False)
    assert grid == grid_b == (8, 8)
    assert a.shape == (5 * 64, 152) and a.dtype == np.float32 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b_)

    class Understated:  # announces 3 images, yields 5: the surplus is kept, in order, with nothing unwritten
        dataset = [0, 0, 0]

        def __iter__(self):
            return ({"image": images[i : i + 2]} for i in range(0, 5, 2))

    c, _ = extract_embeddings(extractor, Understated(), cfg.bank, torch.device("cpu"), progress=False)
    np.testing.assert_array_equal(c, b_)


def test_embed_images_in_cpu_chunks_equals_one_batch():
    """The CPU loop over single images gives the batch's embedding (eval-mode backbone: no batch coupling)."""
    from components.patch_features import embed_images, patch_embedding

    cfg = TocoadConfig()
    b = cfg.backbone
    extractor = create_feature_extractor(b.name, b.weights, b.layers, b.mean, b.std).eval()
    images = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        chunked = embed_images(extractor, images, 3, None)
        whole = patch_embedding(extractor(images), 3, None)
    assert chunked.shape == whole.shape == (3, 152, 8, 8)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


def test_border_rule_changes_only_the_edge_patches():
    """zeros: the 3x3 average counts the zero padding (PatchCore's AvgPool2d), so a constant map keeps its value
    inside and drops to 4/9 in the corners and 6/9 on the edges; valid averages only what lies inside the map."""
    from components.patch_features import aggregate

    level = torch.ones(1, 2, 6, 6)
    zeros, valid = aggregate(level, 3, "zeros"), aggregate(level, 3, "valid")
    assert torch.allclose(valid, level)
    assert torch.allclose(zeros[..., 1:-1, 1:-1], level[..., 1:-1, 1:-1])
    assert zeros[0, 0, 0, 0].item() == pytest.approx(4 / 9) and zeros[0, 0, 0, 3].item() == pytest.approx(
        6 / 9
    )
    with pytest.raises(ValueError, match="border"):
        aggregate(level, 3, "reflect")
