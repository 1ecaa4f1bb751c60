"""Where the model runs and in which precision, decided in one place for every command."""

from __future__ import annotations

import torch

from .errors import M3Error

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' = CUDA when available, else CPU; otherwise any torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise M3Error(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise M3Error(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise M3Error("--device cuda was asked for but CUDA is not available on this machine")
    return device


def resolve_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """'auto' = bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise M3Error(f"unknown dtype {name!r}; use auto, {', '.join(sorted(DTYPES))}") from None
