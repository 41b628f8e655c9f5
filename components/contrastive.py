"""Stage 2: contrastive fine-tuning of the feature extractor F, with the frozen D as a negative guide.

The paper gives no equations; every choice below is ours and is listed with its reason.

* **Dense SimSiam.** The projector and predictor are 1x1 convolutions over the patch-embedding map (the same
  embedding the memory bank stores), and the negative cosine is taken per location between two views of the same
  image. PatchCore scores patches by nearest-neighbour distance, so F must stay good at patch level; a single
  pooled vector would teach it nothing about locations. The two views share geometry (so locations match) and
  differ photometrically (colour jitter, blur, noise), plus a flip that is undone on the feature map. One view
  is the clean image itself, which saves a forward pass on a CPU.
* **Negative guide.** G makes a synthetic anomaly image I_G from a clean image I_R. Where the frozen D says
  "anomalous" (probability > ``d_threshold``), F(I_G) is pushed below cosine ``guide_margin`` to the frozen
  pretrained features of I_R at the same location; elsewhere it is pulled towards them. So anomalies move away
  from the normal manifold while normal content stays where the memory bank expects it. Using D's prediction
  rather than G's mask is the paper's idea: D carries what it learnt about anomalies into F.
* **Forgetting guard.** A proximity term ``1 - cos(F(view), F0(view))`` to the frozen pretrained copy F0 keeps
  the ImageNet features that nearest-neighbour scoring depends on.
* **Collapse guard.** The mean per-dimension std of the L2-normalised projections is logged every step
  (``z_std``); ~1/sqrt(proj_dim) is healthy, values near 0 mean collapse.
* **What trains.** Only F's last ``trainable_blocks`` steps; batch-norm statistics stay frozen, so the bank is
  built with exactly the normalisation that was trained. The frozen first steps are shared by F and F0 and run
  once per batch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from components.backbone import FeatureExtractor
from components.config import TocoadConfig
from components.device import autocast, autocast_dtype, grad_scaler
from components.discriminator import Discriminator
from components.generator import AnomalyGenerator
from components.losses import distill_loss, feature_std, guide_loss, simsiam_loss
from components.patch_features import patch_embedding
from components.training import run_epochs


class ProjectionHeads(nn.Module):
    """SimSiam's projector and predictor as 1x1 convolutions over a dense feature map."""

    def __init__(self, in_dim: int, proj_dim: int = 256, pred_dim: int = 64) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Conv2d(in_dim, proj_dim, 1, bias=False),
            nn.BatchNorm2d(proj_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(proj_dim, proj_dim, 1, bias=False),
            nn.BatchNorm2d(proj_dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Conv2d(proj_dim, pred_dim, 1, bias=False),
            nn.BatchNorm2d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(pred_dim, proj_dim, 1),
        )

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(emb)
        return z, self.predictor(z)


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every batch-norm layer in eval mode so its running statistics do not move."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def photometric(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """A random colour jitter, blur and noise of a [0, 1] batch (per image), keeping the geometry."""
    b, dev = images.shape[0], images.device

    def draw(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=rng, device=dev)).to(images.dtype)

    gray = images.mean(dim=1, keepdim=True)
    out = images * draw(0.7, 1.3)  # brightness
    out = (out - gray.mean(dim=(2, 3), keepdim=True)) * draw(0.7, 1.3) + gray.mean(dim=(2, 3), keepdim=True)
    out = gray + (out - gray) * draw(0.6, 1.4)  # saturation
    blurred = F.avg_pool2d(out, 3, stride=1, padding=1, count_include_pad=False)
    mix = (torch.rand(b, 1, 1, 1, generator=rng, device=dev) < 0.3).to(out.dtype)
    out = mix * blurred + (1 - mix) * out
    out = out + 0.02 * torch.randn(out.shape, generator=rng, device=dev, dtype=out.dtype)
    return out.clamp(0, 1)


class ContrastiveTrainer:
    """Holds F, its frozen copy F0, the heads and frozen D, and computes one step's losses.

    F's first steps are frozen and identical in F and F0, so they run once per batch (the "trunk"); only the last
    ``trainable_blocks`` steps run separately in F (with gradients) and F0.
    """

    def __init__(self, cfg: TocoadConfig, extractor: FeatureExtractor, disc: Discriminator | None) -> None:
        self.cfg = cfg.contrastive
        self.kernel, self.border = cfg.bank.aggregation, cfg.bank.border
        self.f = extractor
        self.f0 = copy.deepcopy(extractor).eval().requires_grad_(False)
        self.disc = disc.eval().requires_grad_(False) if disc is not None else None
        steps = extractor.sequence()
        self.split = max(1, len(steps) - self.cfg.trainable_blocks)
        self.f.requires_grad_(False)
        for module, _ in steps[self.split :]:
            module.requires_grad_(True)
        self.heads = ProjectionHeads(sum(extractor.channels), self.cfg.proj_dim, self.cfg.pred_dim)

    def _tail(self, net: FeatureExtractor, trunk: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        _, levels = net.run_steps(trunk, self.split, len(net.sequence()), levels)
        return patch_embedding(levels, self.kernel, border=self.border)

    def losses(
        self, clean: torch.Tensor, synth: torch.Tensor, rng: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """All loss terms for a batch of clean images and their synthetic-anomaly versions.

        The two SimSiam views are the clean image and a photometric, flipped copy of it; F0's embedding of the
        clean image is both the forgetting guard's target and the negative guide's anchor.
        """
        c, b = self.cfg, clean.shape[0]
        view = (photometric(clean, rng) if c.photometric else clean).flip(-1)
        with torch.no_grad():
            trunk, levels = self.f.run_steps(torch.cat([clean, view, synth]), 0, self.split)
            ref = self._tail(self.f0, trunk[:b], [lv[:b] for lv in levels])
        emb = self._tail(self.f, trunk, levels)
        e1, e2, eg = emb[:b], emb[b : 2 * b].flip(-1), emb[2 * b :]
        out: dict[str, torch.Tensor] = {}
        z1, p1 = self.heads(e1)
        z2, p2 = self.heads(e2)
        out["simsiam"] = simsiam_loss(p1, p2, z1, z2)
        out["distill"] = distill_loss(e1, ref)
        if c.guide and self.disc is not None:
            with torch.no_grad():
                prob = torch.sigmoid(self.disc(synth).float())
                anomalous = F.adaptive_max_pool2d(prob, eg.shape[-2:]) > c.d_threshold
            out["push"], out["pull"] = guide_loss(eg, ref, anomalous, c.guide_margin)
            out["d_anomalous"] = anomalous.float().mean()
        out["total"] = (
            c.simsiam_weight * out["simsiam"]
            + c.distill_weight * out["distill"]
            + c.guide_weight * (out.get("push", 0.0) + out.get("pull", 0.0))
        )
        out["z_std"] = feature_std(z1.detach())
        return out


def train_contrastive(
    cfg: TocoadConfig,
    extractor: FeatureExtractor,
    disc: Discriminator | None,
    loader,
    generator: AnomalyGenerator,
    device: torch.device,
) -> tuple[FeatureExtractor, ProjectionHeads, list[dict[str, float]]]:
    """Stage 2: fine-tune F in place in ``runtime.precision``; returns F (eval mode), the heads and the history."""
    c = cfg.contrastive
    trainer = ContrastiveTrainer(cfg, extractor.to(device), disc.to(device) if disc is not None else None)
    trainer.heads.to(device)
    backbone_params = [p for p in extractor.parameters() if p.requires_grad]
    groups = [{"params": trainer.heads.parameters(), "lr": c.head_lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": c.lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    total = max(1, c.epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    rng = torch.Generator(device=device).manual_seed(cfg.runtime.seed + 1)
    dtype = autocast_dtype(device, cfg.runtime.precision)
    scaler = grad_scaler(device, dtype)

    def step(batch: dict) -> dict[str, float]:
        extractor.train()
        freeze_batchnorm(extractor)
        trainer.heads.train()
        synth = generator(batch["image"].to(device, non_blocking=True), rng)
        with autocast(device, dtype):  # F, F0, the heads and the frozen D; the losses run in fp32
            terms = trainer.losses(synth.clean, synth.image, rng)
        opt.zero_grad(set_to_none=True)
        scaler.scale(terms["total"]).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        return {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()}

    history = run_epochs(loader, c.epochs, step, "stage C", cfg.runtime.progress)
    extractor.eval().requires_grad_(False)
    return extractor, trainer.heads.eval(), history
