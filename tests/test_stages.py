"""The two training stages on a tiny set: D learns to segment G's anomalies; SimSiam falls without collapse."""

import numpy as np
import pytest
import torch
from skimage import data
from sklearn.metrics import roc_auc_score

from components.backbone import create_feature_extractor
from components.config import TocoadConfig
from components.contrastive import train_contrastive
from components.discriminator import train_discriminator
from components.losses import guide_loss, simsiam_loss
from components.pipeline import generator_from_config

SIZE = 64


def _tiny_images(n: int = 16) -> torch.Tensor:
    """Crops of a real brick photograph (ships with scikit-image), [n, 3, SIZE, SIZE] in [0, 1]."""
    brick = np.asarray(data.brick(), dtype=np.float32) / 255.0
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(n):
        y, x = rng.integers(0, brick.shape[0] - SIZE, size=2)
        crops.append(np.repeat(brick[y : y + SIZE, x : x + SIZE, None], 3, axis=2))
    return torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def _loader(images: torch.Tensor, batch: int = 8):
    return [{"image": images[i : i + batch]} for i in range(0, len(images), batch)]


def _cfg(**sections) -> TocoadConfig:
    # Perlin cells of at least 8 px at this size (2^6 cells would be single pixels).
    base = {
        "data": {"image_size": SIZE},
        "runtime": {"progress": False},
        "stage_d": {"width": 16},
        "generator": {"max_scale": 3},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return TocoadConfig.from_dict(base)


def test_discriminator_learns_synthetic_anomalies():
    torch.manual_seed(0)
    cfg = _cfg(stage_d={"epochs": 12, "lr": 3e-3})
    gen = generator_from_config(cfg)
    model, history = train_discriminator(cfg, _loader(_tiny_images()), gen, torch.device("cpu"))
    assert history[-1]["loss"] < history[0]["loss"]
    synth = generator_from_config(cfg, anomaly_prob=1.0)(_tiny_images(8), torch.Generator().manual_seed(9))
    with torch.no_grad():
        prob = torch.sigmoid(model(synth.image))
    auroc = roc_auc_score(synth.mask.flatten().numpy() > 0.5, prob.flatten().numpy())
    assert auroc > 0.85, auroc


def test_simsiam_falls_without_collapse():
    torch.manual_seed(0)
    cfg = _cfg(contrastive={"epochs": 6, "guide": False, "proj_dim": 64, "pred_dim": 16, "head_lr": 5e-3})
    f = create_feature_extractor("tf_efficientnet_lite0", "builtin", (2, 3))
    before = [p.clone() for p in f.parameters()]
    _, heads, history = train_contrastive(
        cfg, f, None, _loader(_tiny_images()), generator_from_config(cfg), torch.device("cpu")
    )
    assert history[-1]["simsiam"] < history[0]["simsiam"]
    assert all(h["z_std"] > 0.3 / np.sqrt(64) for h in history), "projections collapsed"
    assert any(not torch.equal(a, b) for a, b in zip(before, f.parameters(), strict=True)), "F did not train"
    assert history[-1]["distill"] < 0.2, "F drifted far from its pretrained features"


def test_guided_stage_uses_discriminator():
    torch.manual_seed(0)
    cfg = _cfg(stage_d={"epochs": 3}, contrastive={"epochs": 1, "proj_dim": 32, "pred_dim": 8})
    gen = generator_from_config(cfg)
    disc, _ = train_discriminator(cfg, _loader(_tiny_images(8)), gen, torch.device("cpu"))
    f = create_feature_extractor("tf_efficientnet_lite0", "builtin", (2, 3))
    _, _, history = train_contrastive(cfg, f, disc, _loader(_tiny_images(8)), gen, torch.device("cpu"))
    assert {"push", "pull", "d_anomalous"} <= set(history[0])


def test_guide_loss_pushes_only_anomalous_locations():
    anchor = torch.randn(1, 8, 4, 4)
    same = anchor.clone()
    anomalous = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    anomalous[..., 0, 0] = True
    push, pull = guide_loss(same, anchor, anomalous, margin=0.5)
    assert push == pytest.approx(0.5) and pull == pytest.approx(0.0, abs=1e-6)
    push, _ = guide_loss(-same, anchor, anomalous, margin=0.5)
    assert push == 0.0


def test_simsiam_loss_bounds():
    z = torch.randn(2, 8, 3, 3)
    assert simsiam_loss(z, z, z, z).item() == pytest.approx(-1.0, abs=1e-5)
    assert simsiam_loss(z, z, -z, -z).item() == pytest.approx(1.0, abs=1e-5)
