"""Where computation runs (CUDA when present, else the CPU) and in which precision training runs there."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda`` without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def _native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes bf16 natively (Ampere and later), not by slow emulation."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The autocast dtype of training on ``device`` for ``runtime.precision``; None means plain fp32.

    ``auto``: bf16 on CUDA GPUs with native bf16, fp16 (with a GradScaler, see :func:`grad_scaler`) on older CUDA
    GPUs, fp32 elsewhere. ``bf16`` is also allowed on the CPU (slower than fp32 there on most CPUs; it lets the
    mixed-precision path be tested without a GPU); ``fp16`` needs CUDA.
    """
    if precision == "fp32":
        return None
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    if precision == "fp16":
        if not cuda:
            raise ValueError(
                f"runtime.precision=fp16 on {device.type}: fp16 autocast needs CUDA; use precision=bf16 or fp32 on CPU"
            )
        return torch.float16
    if precision == "bf16":
        if cuda and not _native_bf16(device):
            raise ValueError(
                f"runtime.precision=bf16: {torch.cuda.get_device_name(device)} has no native bf16; "
                "use precision=fp16 or auto"
            )
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"runtime.precision=bf16 is supported on cuda and cpu, not {device.type}")
        return torch.bfloat16
    raise ValueError(f"unknown runtime.precision {precision!r}; choose auto, fp32, bf16 or fp16")


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the name of an :func:`autocast_dtype` result, for logs and manifests."""
    return _NAMES[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; with None, autocast is off (plain fp32) inside the block."""
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler for fp16 training (fp16 gradients underflow without one); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
