"""Stage 1: the discriminative network D, trained on G's synthetic anomalies to segment them.

Like DRAEM's discriminative sub-network, D is a U-Net that outputs a per-pixel anomaly logit and is trained with
focal loss (gamma = 2). Ours, not the paper's: D's encoder is a pretrained timm backbone (EfficientNet-Lite0 by
default, three levels at strides 4-16) with a light decoder whose logits are upsampled from stride 4, and D sees only
the image (there is no reconstruction network). A pretrained encoder learns the task from a few hundred images in minutes on a CPU, where DRAEM's
randomly initialised U-Net needs hundreds of GPU epochs. A soft-Dice term is added to the focal loss because it
rewards the anomaly's full extent, which the negative guide of stage 2 relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.backbone import FeatureExtractor, create_feature_extractor
from components.config import TocoadConfig
from components.device import autocast, autocast_dtype, grad_scaler
from components.generator import AnomalyGenerator
from components.losses import focal_loss, soft_dice_loss
from components.training import run_epochs

D_ENCODER = "tf_efficientnet_lite0"
D_LAYERS = (1, 2, 3)  # strides 4, 8, 16: a stride-2 decoder level would cost 3x the encoder


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Discriminator(nn.Module):
    """U-Net: pretrained encoder levels (coarse to fine) merged by upsampling and 3x3 conv blocks."""

    def __init__(self, encoder: FeatureExtractor, width: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        chans = encoder.channels[::-1]  # deepest first
        self.blocks = nn.ModuleList()
        cin = chans[0]
        for skip in chans[1:]:
            self.blocks.append(_conv_block(cin + skip, width))
            cin = width
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel anomaly logits ``[B, 1, H, W]`` for a [0, 1] RGB batch."""
        levels = self.encoder(images)[::-1]
        x = levels[0]
        for block, skip in zip(self.blocks, levels[1:], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        logits = self.head(x)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def train(self, mode: bool = True) -> Discriminator:
        """Train the decoder; the encoder's batch-norm statistics stay as pretrained (small batches)."""
        super().train(mode)
        self.encoder.eval()
        return self


def create_discriminator(cfg: TocoadConfig, pretrained: bool = True) -> Discriminator:
    """D with its encoder's offline ImageNet weights (``pretrained=False`` when weights follow from a bundle)."""
    weights = "builtin" if pretrained and cfg.backbone.weights != "none" else "none"
    encoder = create_feature_extractor(D_ENCODER, weights=weights, layers=D_LAYERS)
    return Discriminator(encoder, cfg.stage_d.width)


def train_discriminator(
    cfg: TocoadConfig, loader, generator: AnomalyGenerator, device: torch.device
) -> tuple[Discriminator, list[dict[str, float]]]:
    """Stage 1: fit D to segment G's synthetic anomalies in the training images, in ``runtime.precision``."""
    sd = cfg.stage_d
    model = create_discriminator(cfg).to(device).train()
    params = [
        {"params": [p for n, p in model.named_parameters() if not n.startswith("encoder.")], "lr": sd.lr},
        {"params": model.encoder.parameters(), "lr": sd.encoder_lr},
    ]
    if sd.encoder_lr == 0:
        model.encoder.requires_grad_(False)
        params = params[:1]
    opt = torch.optim.AdamW(params, weight_decay=1e-4)
    total = max(1, sd.epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in params], total_steps=total, pct_start=0.1
    )
    rng = torch.Generator(device=device).manual_seed(cfg.runtime.seed)
    dtype = autocast_dtype(device, cfg.runtime.precision)
    scaler = grad_scaler(device, dtype)

    def step(batch: dict) -> dict[str, float]:
        synth = generator(batch["image"].to(device, non_blocking=True), rng)
        with autocast(device, dtype):
            logits = model(synth.image)
            focal = focal_loss(logits, synth.mask, sd.focal_gamma)  # losses run in fp32
            dice = soft_dice_loss(logits, synth.mask)
            loss = focal + sd.dice_weight * dice
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        return {"loss": loss.item(), "focal": focal.item(), "dice": dice.item()}

    history = run_epochs(loader, sd.epochs, step, "stage D", cfg.runtime.progress)
    return model.eval(), history


@torch.inference_mode()
def predict_probability(model: Discriminator, images: torch.Tensor) -> torch.Tensor:
    """D's anomaly probability map ``[B, 1, H, W]``."""
    return torch.sigmoid(model(images))
