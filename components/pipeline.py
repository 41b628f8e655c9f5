"""The training stages and how their outputs are saved, loaded and chained.

Each stage reads the previous stage's output and adds its own, so a stage is the unit that runs as one
Kubernetes job:

* ``d``    -- stage 1: train the discriminative network D on G's synthetic anomalies;
* ``c``    -- stage 2: fine-tune F contrastively with D as a negative guide (or keep F pretrained);
* ``bank`` -- build the memory bank from F, calibrate the threshold on held-out normals and synthetic anomalies,
  record the drift profile. Its output is a complete, servable model bundle.

Every stage output is a bundle (see :mod:`components.bundle`) holding the files made so far.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.adaptor import PatchAdaptor, flag_patches, train_adaptor
from components.backbone import FeatureExtractor, create_feature_extractor
from components.bundle import (
    BundleError,
    load_tensors,
    read_manifest,
    save_tensors,
    verify_bundle,
    write_bundle,
    write_json,
)
from components.calibration import Calibration, fit_calibration, outlier_fence
from components.config import TocoadConfig
from components.contrastive import ProjectionHeads, train_contrastive
from components.datasets import DatasetSplits, Sample, discover, fingerprint, split_holdout
from components.device import autocast_dtype, precision_name, resolve_device
from components.discriminator import Discriminator, create_discriminator, train_discriminator
from components.generator import AnomalyGenerator, GeneratorSettings, make_generator
from components.memory_bank import coreset_indices, extract_embeddings
from components.model import AnomalyModel
from components.nn_index import build_index, index_from_bytes, index_to_bytes
from components.out_of_fold import out_of_fold_scores
from components.patch_features import embed_images
from components.profile import build_profile, image_statistics
from components.scoring import anomaly_map
from components.training import make_loader

STAGES = ("d", "c", "bank")
# Config sections each stage depends on; a later stage refuses an input made with different values.
STAGE_SECTIONS = {"d": ("data", "generator", "stage_d"), "c": ("backbone", "contrastive"), "bank": ("bank",)}


@dataclass
class Artifacts:
    """Everything the stages have produced so far; saved to and loaded from a bundle."""

    cfg: TocoadConfig
    data_fingerprint: str
    stages: list[str] = field(default_factory=list)
    disc: Discriminator | None = None
    extractor: FeatureExtractor | None = None
    heads: ProjectionHeads | None = None
    adaptor: PatchAdaptor | None = None
    bank: np.ndarray | None = None
    index: Any = None
    calibration: Calibration | None = None
    profile: dict[str, Any] | None = None
    history: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def model(self, device: torch.device | None = None) -> AnomalyModel:
        """The servable detector; needs the bank stage."""
        if self.bank is None or self.extractor is None:
            raise BundleError("this bundle has no memory bank yet; run `tocoad train --stage bank` on it")
        return AnomalyModel(
            self.cfg, self.extractor, self.bank, self.index, self.calibration, device, self.adaptor
        )


def generator_from_config(cfg: TocoadConfig, anomaly_prob: float | None = None) -> AnomalyGenerator:
    """G as configured (``anomaly_prob`` overrides the config, e.g. 1.0 for calibration)."""
    g = cfg.generator
    return make_generator(
        GeneratorSettings(
            kind=g.kind,
            anomaly_prob=g.anomaly_prob if anomaly_prob is None else anomaly_prob,
            opacity=(g.opacity_min, g.opacity_max),
            min_scale=g.min_scale,
            max_scale=g.max_scale,
            threshold=g.threshold,
            max_rotation_deg=g.max_rotation_deg,
            rotate90=g.rotate90,
            texture_dir=g.texture_dir,
        )
    )


def training_split(cfg: TocoadConfig, data: DatasetSplits) -> tuple[list[Sample], list[Sample]]:
    """(images the stages learn from, held-out normals used only for calibration)."""
    train, holdout = split_holdout(data.train, cfg.data.holdout_fraction, cfg.runtime.seed)
    if not train:
        raise ValueError(
            f"no training images left in {data.root} after holding out {cfg.data.holdout_fraction}"
        )
    return train, holdout


def data_loader(cfg: TocoadConfig, samples: list[Sample], batch_size: int, shuffle: bool):
    return make_loader(
        samples,
        cfg.data.image_size,
        batch_size,
        cfg.runtime.num_workers,
        shuffle,
        cfg.runtime.seed,
        max_pixels=cfg.data.max_image_pixels,
    )


def run_stage(name: str, art: Artifacts, data: DatasetSplits, device: torch.device) -> Artifacts:
    """Run one stage on ``art`` in place and return it."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    cfg = art.cfg
    train, holdout = training_split(cfg, data)
    torch.manual_seed(cfg.runtime.seed)
    precision = precision_name(autocast_dtype(device, cfg.runtime.precision))
    if name == "d":
        if cfg.stage_d.enabled and cfg.stage_d.epochs > 0:
            loader = data_loader(cfg, train, cfg.stage_d.batch_size, shuffle=True)
            art.disc, art.history["d"] = train_discriminator(cfg, loader, generator_from_config(cfg), device)
            art.metrics.setdefault("precision", {})["d"] = precision
    elif name == "c":
        extractor = create_feature_extractor(**_backbone_args(cfg)).to(device)
        c = cfg.contrastive
        if c.enabled and c.mode == "adaptor" and c.adaptor_epochs > 0:
            disc = art.disc if c.guide else None
            normal, synthetic, flags = adaptor_inputs(cfg, extractor, disc, train, device)
            art.adaptor, art.history["c"] = train_adaptor(cfg, normal, synthetic, flags, cfg.runtime.progress)
            art.adaptor.to(device)
        elif c.enabled and c.mode == "finetune" and c.epochs > 0:
            loader = data_loader(cfg, train, cfg.contrastive.batch_size, shuffle=True)
            art.metrics.setdefault("precision", {})["c"] = precision
            disc = art.disc if cfg.contrastive.guide else None
            extractor, art.heads, art.history["c"] = train_contrastive(
                cfg, extractor, disc, loader, generator_from_config(cfg), device
            )
        art.extractor = extractor
    else:
        if art.extractor is None:
            raise BundleError("the bank stage needs stage c's output (F); run `tocoad train --stage c` first")
        build_bank(art, train, holdout, device)
    art.stages = [s for s in STAGES if s in art.stages or s == name]
    return art


def _backbone_args(cfg: TocoadConfig) -> dict[str, Any]:
    b = cfg.backbone
    return {"name": b.name, "weights": b.weights, "layers": b.layers, "mean": b.mean, "std": b.std}


def adaptor_inputs(
    cfg: TocoadConfig,
    extractor: FeatureExtractor,
    disc: Discriminator | None,
    samples: list[Sample],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen patch embeddings of ``samples`` ``[N, C, h, w]``, of ``synthetic_per_image`` synthetic anomalies per
    image ``[M, C, h, w]``, and the synthetic patches flagged as anomalous ``[M, h, w]``: by D's probability above
    ``d_threshold`` when ``disc`` is given (the negative guide), else by G's mask covering over half a patch."""
    c = cfg.contrastive
    gen = generator_from_config(cfg, anomaly_prob=1.0)
    rng = torch.Generator(device=device).manual_seed(cfg.runtime.seed + 1)
    normal, synthetic, flags = [], [], []
    b = cfg.bank
    with torch.no_grad():
        for batch in data_loader(cfg, samples, cfg.runtime.batch_size, shuffle=False):
            images = batch["image"].to(device)
            normal.append(
                embed_images(extractor, images, b.aggregation, b.feature_dim, border=b.border).cpu()
            )
            for _ in range(c.synthetic_per_image):
                synth = gen(images, rng)
                emb = embed_images(extractor, synth.image, b.aggregation, b.feature_dim, border=b.border)
                synthetic.append(emb.cpu())
                if disc is not None:
                    prob, level = torch.sigmoid(disc(synth.image).float()), c.d_threshold
                else:
                    prob, level = synth.mask, 0.5
                flags.append(flag_patches(prob, tuple(emb.shape[-2:]), level).cpu())
    return torch.cat(normal).float(), torch.cat(synthetic).float(), torch.cat(flags)


def build_bank(art: Artifacts, train: list[Sample], holdout: list[Sample], device: torch.device) -> None:
    """Memory bank, faiss index, calibration and drift profile, in place on ``art``.

    The threshold comes from out-of-fold scores of every training image (:mod:`components.out_of_fold`) plus the
    scores of any held-out images; synthetic anomalies only give its sanity figures.
    """
    cfg, progress = art.cfg, art.cfg.runtime.progress
    loader = data_loader(cfg, train, cfg.runtime.batch_size, shuffle=False)
    embeddings, grid = extract_embeddings(art.extractor, loader, cfg.bank, device, progress, art.adaptor)
    rows = coreset_indices(embeddings, cfg.bank, cfg.runtime.seed, progress)
    art.bank = np.ascontiguousarray(embeddings[rows])
    art.index = build_index(art.bank, kind=cfg.bank.index)
    c = cfg.calibration
    folds = out_of_fold_scores(embeddings, grid, cfg.bank, c.folds, cfg.runtime.seed, rows, progress)
    del embeddings
    model = art.model(device)
    normal_scores, normal_patch = [folds.scores], [folds.patch]
    for batch in data_loader(cfg, holdout, cfg.runtime.batch_size, shuffle=False) if holdout else ():
        pred = model.predict(batch["image"].to(device), with_maps=False)
        normal_scores.append(pred.scores)
        normal_patch.append(pred.patch_scores)
    patch = np.concatenate(normal_patch)
    size = (cfg.data.image_size, cfg.data.image_size)
    normal_maps = anomaly_map(torch.from_numpy(patch), size, cfg.bank.blur_sigma)[:, ::4, ::4].numpy()
    synth_scores, synth_maps, synth_masks = _synthetic_check(cfg, model, train, device)
    stats: dict[str, list[np.ndarray]] = {}
    for batch in data_loader(cfg, train + holdout, cfg.runtime.batch_size, shuffle=False):
        for key, value in image_statistics(batch["image"]).items():
            stats.setdefault(key, []).append(value)
    normal_scores_a = np.concatenate(normal_scores)
    pixel_kwargs: dict[str, Any] = {"normal_pixel_scores": normal_maps.ravel()}
    if synth_maps is not None:
        pixel_kwargs.update(
            synthetic_pixel_scores=synth_maps.ravel(), synthetic_pixel_labels=synth_masks.ravel()
        )
    art.calibration = fit_calibration(
        normal_scores_a,
        synth_scores,
        normal_quantile=1.0 - c.false_alarm_rate,
        pixel_quantile=1.0 - c.pixel_false_alarm_rate,
        outlier_iqr=c.outlier_iqr,
        **pixel_kwargs,
    )
    art.profile = build_profile(
        normal_scores_a, patch.ravel(), {k: np.concatenate(v) for k, v in stats.items()}
    )
    image = art.calibration.image
    art.metrics["calibration"] = {
        "normal_images": int(len(normal_scores_a)),
        "folds": int(folds.fold.max() + 1),
        "holdout_images": len(holdout),
        "synthetic_images": 0 if synth_scores is None else len(synth_scores),
        "bank_patches": len(art.bank),
        "threshold": image.threshold,
        "method": image.method,
        "false_alarm_rate": c.false_alarm_rate,
        "synthetic_recall": image.synthetic_recall,
        "atypical_images": _atypical(normal_scores_a, train + holdout, c.outlier_iqr),
    }


def _atypical(scores: np.ndarray, samples: list[Sample], k: float, most: int = 20) -> list[dict[str, Any]]:
    """The training images beyond the far-out fence, highest score first (at most ``most``): worth a look."""
    fence = outlier_fence(scores, k)
    order = [i for i in np.argsort(-scores) if scores[i] > fence][:most]
    return [{"path": str(samples[i].path), "score": float(scores[i])} for i in order]


def _synthetic_check(
    cfg: TocoadConfig, model: AnomalyModel, train: list[Sample], device: torch.device
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Scores, maps (every 4th pixel) and masks of G's anomalies on a seeded subset of the training images."""
    count = min(cfg.calibration.synthetic_images, len(train))
    if count == 0:
        return None, None, None
    pick = np.random.default_rng(cfg.runtime.seed + 2).choice(len(train), count, replace=False)
    gen = generator_from_config(cfg, anomaly_prob=1.0)
    rng = torch.Generator(device=device).manual_seed(cfg.runtime.seed + 2)
    scores, maps, masks = [], [], []
    for batch in data_loader(cfg, [train[i] for i in sorted(pick)], cfg.runtime.batch_size, shuffle=False):
        synth = gen(batch["image"].to(device), rng)
        pred = model.predict(synth.image)
        scores.append(pred.scores)
        maps.append(pred.maps[:, ::4, ::4])
        masks.append(synth.mask[:, 0, ::4, ::4].cpu().numpy() > 0.5)
    return np.concatenate(scores), np.concatenate(maps), np.concatenate(masks)


# ---------------------------------------------------------------- saving and loading


def save_artifacts(art: Artifacts, out_dir: Path, overwrite: bool = False) -> Path:
    """Write ``art`` as a bundle at ``out_dir`` (atomically)."""

    def populate(tmp: Path) -> None:
        (tmp / "config.yaml").write_text(art.cfg.to_yaml())
        if art.disc is not None:
            save_tensors(tmp / "discriminator.safetensors", art.disc.state_dict())
        if art.extractor is not None:
            save_tensors(tmp / "feature_extractor.safetensors", art.extractor.state_dict())
        if art.heads is not None:
            save_tensors(tmp / "heads.safetensors", art.heads.state_dict())
        if art.adaptor is not None:
            save_tensors(tmp / "adaptor.safetensors", art.adaptor.state_dict())
        if art.bank is not None:
            save_tensors(tmp / "memory_bank.safetensors", {"bank": torch.from_numpy(art.bank).half()})
            (tmp / "index.faiss").write_bytes(index_to_bytes(art.index))
        if art.calibration is not None:
            write_json(tmp / "calibration.json", art.calibration.to_dict())
        if art.profile is not None:
            write_json(tmp / "profile.json", art.profile)

    manifest = {
        "stages": art.stages,
        "config": art.cfg.model_dump(mode="json"),
        "data_fingerprint": art.data_fingerprint,
        "history": art.history,
        "metrics": art.metrics,
    }
    return write_bundle(out_dir, populate, manifest, overwrite=overwrite)


def load_artifacts(bundle_dir: Path, device: torch.device | None = None) -> Artifacts:
    """Read a bundle after verifying every checksum; no file is unpickled."""
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    cfg = TocoadConfig.from_dict(manifest["config"])
    art = Artifacts(cfg, manifest.get("data_fingerprint", ""), list(manifest.get("stages", [])))
    art.history, art.metrics = manifest.get("history", {}), manifest.get("metrics", {})
    files = manifest["files"]
    if "discriminator.safetensors" in files:
        art.disc = create_discriminator(cfg, pretrained=False)
        art.disc.load_state_dict(load_tensors(bundle_dir / "discriminator.safetensors"))
        art.disc.eval()
    if "feature_extractor.safetensors" in files:
        art.extractor = create_feature_extractor(**{**_backbone_args(cfg), "weights": "none"})
        art.extractor.load_state_dict(load_tensors(bundle_dir / "feature_extractor.safetensors"))
        art.extractor.eval()
    if "heads.safetensors" in files:
        art.heads = ProjectionHeads(
            sum(art.extractor.channels), cfg.contrastive.proj_dim, cfg.contrastive.pred_dim
        )
        art.heads.load_state_dict(load_tensors(bundle_dir / "heads.safetensors"))
    if "adaptor.safetensors" in files:
        art.adaptor = PatchAdaptor(_embedding_dim(cfg, art.extractor), linear=cfg.contrastive.adaptor_linear)
        art.adaptor.load_state_dict(load_tensors(bundle_dir / "adaptor.safetensors"))
        art.adaptor.eval()
    if "memory_bank.safetensors" in files:
        art.bank = load_tensors(bundle_dir / "memory_bank.safetensors")["bank"].float().numpy()
        art.index = index_from_bytes((bundle_dir / "index.faiss").read_bytes())
    if "calibration.json" in files:
        art.calibration = Calibration.from_dict(_read_json(bundle_dir / "calibration.json"))
    if "profile.json" in files:
        art.profile = _read_json(bundle_dir / "profile.json")
    if device is not None:
        for module in (art.disc, art.extractor, art.heads, art.adaptor):
            if module is not None:
                module.to(device)
    return art


def _embedding_dim(cfg: TocoadConfig, extractor: FeatureExtractor | None) -> int:
    """Channels of a patch embedding: ``bank.feature_dim`` or the sum of F's two levels."""
    if cfg.bank.feature_dim is not None:
        return cfg.bank.feature_dim
    if extractor is None:
        raise BundleError("the bundle has an adaptor but no feature extractor")
    return sum(extractor.channels)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def bundle_config(bundle_dir: Path) -> TocoadConfig:
    """The config a bundle was made with, read from its manifest without loading any weights."""
    return TocoadConfig.from_dict(read_manifest(bundle_dir)["config"])


def check_compatible(previous: TocoadConfig, cfg: TocoadConfig, stage: str) -> None:
    """Refuse to continue from a stage output whose earlier-stage settings differ from ``cfg``."""
    for earlier in STAGES[: STAGES.index(stage)]:
        for section in STAGE_SECTIONS[earlier]:
            before, now = getattr(previous, section), getattr(cfg, section)
            if before != now:
                raise ValueError(
                    f"the input of stage {stage} was made with different `{section}` settings; "
                    f"rerun stage {earlier} with this config, or use the config saved in the input bundle"
                )


# ---------------------------------------------------------------- entry points


def train(
    cfg: TocoadConfig,
    data_root: Path,
    out_dir: Path,
    stage: str | None = None,
    previous: Path | None = None,
    overwrite: bool = False,
) -> Artifacts:
    """Run all stages (``stage=None``) or one stage from ``previous``'s output, and save the bundle."""
    device = resolve_device(cfg.runtime.device)
    autocast_dtype(device, cfg.runtime.precision)  # fp16 on a CPU fails here, before any work
    data = discover(Path(data_root), cfg.data.layout)
    data_fp = fingerprint(data.train)
    if stage in (None, "d"):
        art = Artifacts(cfg, data_fp)
    else:
        if previous is None:
            raise ValueError(f"stage {stage} continues from an earlier stage's output: pass --from DIR")
        art = load_artifacts(previous, device)
        check_compatible(art.cfg, cfg, stage)
        if art.data_fingerprint != data_fp:
            raise ValueError(
                f"{previous} was trained on other data than {data_root}; rerun the earlier stages on this data"
            )
        art.cfg = cfg
    for name in STAGES if stage is None else (stage,):
        start = time.perf_counter()
        run_stage(name, art, data, device)
        art.metrics.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - start, 2)
    if out_dir.exists() and previous is not None and Path(previous).resolve() == Path(out_dir).resolve():
        overwrite = True
    save_artifacts(art, out_dir, overwrite=overwrite)
    return art
