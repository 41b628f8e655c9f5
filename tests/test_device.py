"""Device and training precision: which autocast dtype each runtime.precision means on which device."""

from typing import get_args

import pytest
import torch

from components.config import RuntimeConfig
from components.device import Precision, autocast, autocast_dtype, grad_scaler, precision_name

CPU = torch.device("cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_config_precision_choices_match_the_resolver():
    assert get_args(RuntimeConfig.model_fields["precision"].annotation) == get_args(Precision)


def test_precision_on_cpu():
    assert autocast_dtype(CPU, "auto") is None  # fp32 on CPU by default
    assert autocast_dtype(CPU, "fp32") is None
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16  # allowed explicitly (tests the mixed path)
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA; use precision=bf16 or fp32 on CPU"):
        autocast_dtype(CPU, "fp16")
    with pytest.raises(ValueError, match="unknown runtime.precision"):
        autocast_dtype(CPU, "fp8")  # type: ignore[arg-type]
    names = [precision_name(autocast_dtype(CPU, p)) for p in ("auto", "fp32", "bf16")]
    assert names == ["fp32", "fp32", "bf16"]


def test_autocast_context_and_scaler_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(CPU, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with autocast(CPU, None):  # None: autocast off inside, even within an autocast region
            assert (a @ b).dtype == torch.float32
    assert not grad_scaler(CPU, torch.bfloat16).is_enabled()
    assert not grad_scaler(CPU, None).is_enabled()


@cuda_only
def test_precision_on_cuda():
    gpu = torch.device("cuda")
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert autocast_dtype(gpu, "auto") is (torch.bfloat16 if native_bf16 else torch.float16)
    assert autocast_dtype(gpu, "fp16") is torch.float16
    assert autocast_dtype(gpu, "fp32") is None
    assert grad_scaler(gpu, torch.float16).is_enabled()
    assert not grad_scaler(gpu, torch.bfloat16).is_enabled()
