"""The two training stages on a tiny set: D learns to segment G's anomalies; SimSiam falls without collapse."""

import math

import numpy as np
import pytest
import torch
from skimage import data
from sklearn.metrics import roc_auc_score

import components.discriminator as discriminator_module
from components.backbone import create_feature_extractor
from components.config import TocoadConfig
from components.contrastive import train_contrastive
from components.demo_data import make_demo_dataset
from components.device import autocast
from components.discriminator import create_discriminator, train_discriminator
from components.losses import distill_loss, feature_std, focal_loss, guide_loss, simsiam_loss, soft_dice_loss
from components.pipeline import generator_from_config, train

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


# ---------------------------------------------------------------- mixed precision (bf16 autocast runs on the CPU too)
CPU = torch.device("cpu")


def _record_dtypes(module: torch.nn.Module, seen: set) -> None:
    module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))


def _last_conv(module: torch.nn.Module) -> torch.nn.Module:
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def test_losses_run_in_fp32_inside_autocast():
    logits, mask = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    z, p = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    anomalous = torch.rand(2, 1, 4, 4) > 0.5
    with autocast(CPU, torch.bfloat16):
        terms = [
            focal_loss(logits.bfloat16(), mask),
            soft_dice_loss(logits.bfloat16(), mask),
            simsiam_loss(p.bfloat16(), p.bfloat16(), z.bfloat16(), z.bfloat16()),
            distill_loss(z.bfloat16(), p),
            *guide_loss(z.bfloat16(), p.bfloat16(), anomalous, margin=0.5),
            feature_std(z.bfloat16()),
        ]
    assert all(t.dtype == torch.float32 for t in terms)
    assert focal_loss(logits, mask) == pytest.approx(terms[0].item(), rel=2e-2)


def test_discriminator_trains_in_bf16_on_cpu(monkeypatch):
    torch.manual_seed(0)
    cfg = _cfg(stage_d={"epochs": 1}, runtime={"precision": "bf16"})
    seen: set = set()
    before: dict[str, torch.Tensor] = {}

    def create(*args, **kwargs):
        model = create_discriminator(*args, **kwargs)
        before.update({n: p.detach().clone() for n, p in model.named_parameters()})
        _record_dtypes(model.head, seen)
        return model

    monkeypatch.setattr(discriminator_module, "create_discriminator", create)
    gen = generator_from_config(cfg)
    model, history = train_discriminator(cfg, _loader(_tiny_images(8), batch=4), gen, CPU)
    assert seen == {torch.bfloat16}, "D's forward did not run under bf16 autocast"
    assert all(math.isfinite(history[0][k]) for k in ("loss", "focal", "dice"))
    after = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values()), "weights must stay fp32"
    assert not torch.equal(before["head.weight"], after["head.weight"]), "D's decoder did not train"


def test_contrastive_trains_in_bf16_on_cpu():
    torch.manual_seed(0)
    cfg = _cfg(contrastive={"epochs": 1, "proj_dim": 32, "pred_dim": 8}, runtime={"precision": "bf16"})
    disc = create_discriminator(cfg)  # an untrained frozen guide: only the precision it runs in matters here
    f = create_feature_extractor("tf_efficientnet_lite0", "builtin", (2, 3))
    seen_f: set = set()
    seen_d: set = set()
    _record_dtypes(_last_conv(f), seen_f)  # F0, a copy of F, carries the hook too
    _record_dtypes(disc.head, seen_d)
    before = [p.detach().clone() for p in f.parameters()]
    gen = generator_from_config(cfg)
    _, heads, history = train_contrastive(cfg, f, disc, _loader(_tiny_images(8), batch=4), gen, CPU)
    assert seen_f == {torch.bfloat16} and seen_d == {torch.bfloat16}
    assert {"simsiam", "distill", "push", "pull", "total"} <= set(history[0])
    assert all(math.isfinite(v) for v in history[0].values())
    assert any(not torch.equal(a, b) for a, b in zip(before, f.parameters(), strict=True)), "F did not train"
    assert all(p.dtype == torch.float32 for p in [*f.parameters(), *heads.parameters()])


def test_pipeline_records_precision_and_refuses_fp16_on_cpu(tmp_path):
    data = make_demo_dataset(tmp_path / "data", n_train=8, n_test_good=2, n_test_defect=2, image_size=SIZE)
    tiny = ["data.image_size=64", "generator.max_scale=3", "stage_d.enabled=true", "stage_d.epochs=1",
            "stage_d.width=16", "runtime.num_workers=0", "runtime.progress=false"]  # fmt: skip
    cfg = TocoadConfig().with_overrides([*tiny, "runtime.precision=bf16"])
    art = train(cfg, data, tmp_path / "d", stage="d")
    assert art.metrics["precision"] == {"d": "bf16"}
    fp16 = cfg.with_overrides(["runtime.precision=fp16"])
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        train(fp16, tmp_path / "no-such-data", tmp_path / "d16", stage="d")  # fails before reading any data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_both_stages_train_in_mixed_precision_on_cuda(precision):
    torch.manual_seed(0)
    gpu = torch.device("cuda")
    cfg = _cfg(stage_d={"epochs": 1}, contrastive={"epochs": 1, "proj_dim": 32, "pred_dim": 8},
               runtime={"precision": precision})  # fmt: skip
    gen = generator_from_config(cfg)
    disc, d_hist = train_discriminator(cfg, _loader(_tiny_images(8).to(gpu), batch=4), gen, gpu)
    f = create_feature_extractor("tf_efficientnet_lite0", "builtin", (2, 3))
    _, _, c_hist = train_contrastive(cfg, f, disc, _loader(_tiny_images(8).to(gpu), batch=4), gen, gpu)
    assert all(math.isfinite(v) for v in [*d_hist[0].values(), *c_hist[0].values()])
