"""The KV codecs of a bank's kv.data records: bf16 (exact to bfloat16), int8 (one float16 scale
per vector) and vq (product quantization; its codebooks and code math live in vq.py).

Pure tensor and byte math; knows nothing about files (format_spec.md gives the layouts).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import BankError, M3Error

CODECS = ("bf16", "int8", "vq")


def record_bytes(codec: str, shape: tuple[int, int, int, int, int], subquantizers: int | None = None) -> int:
    """Bytes of one reference's kv.data record for a memory of `shape` (L, 2, H, K, d)."""
    L, two, H, K, d = shape
    if codec == "bf16":
        return 2 * L * two * H * K * d
    if codec == "int8":
        return L * two * H * K * (d + 2)
    if codec == "vq":
        if not subquantizers or d % subquantizers:
            raise M3Error(f"vq needs a number of sub-quantizers that divides the head dim {d}")
        return L * two * H * K * subquantizers
    raise M3Error(f"unknown KV codec {codec!r}; choose one of {', '.join(CODECS)}")


def encode_kv(kv: torch.Tensor, codec: str) -> bytes:
    """kv (L, 2, H, K, d) float -> one kv.data record."""
    if codec == "bf16":
        return kv.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().astype("<i2").tobytes()
    if codec == "int8":
        x = kv.detach().float().cpu()
        scale = x.abs().amax(dim=-1) / 127.0  # (L, 2, H, K)
        scale = scale.to(torch.float16).float()  # stored precision
        q = torch.where(scale[..., None] > 0, torch.round(x / scale.clamp_min(1e-30)[..., None]), torch.zeros_like(x))
        q = q.clamp(-127, 127).to(torch.int8)
        return q.numpy().tobytes() + scale.to(torch.float16).numpy().astype("<f2").tobytes()
    raise M3Error(f"unknown KV codec {codec!r}; choose one of {', '.join(CODECS)}")


def decode_kv(buf: np.ndarray, codec: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Records (n, record_bytes) uint8 -> tensor (n, L, 2, H, K, d), float32 unless `dtype` says
    otherwise (bf16 records asked for as bfloat16 come back as stored, without a conversion)."""
    n = buf.shape[0]
    if codec == "bf16":
        raw = np.ascontiguousarray(buf).view("<i2").reshape((n,) + tuple(shape))
        return torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16).to(dtype)
    if codec == "int8":
        L, two, H, K, d = shape
        nv = L * two * H * K * d
        q = np.ascontiguousarray(buf[:, :nv]).view(np.int8).reshape((n,) + tuple(shape))
        s = np.ascontiguousarray(buf[:, nv:]).view("<f2").reshape((n, L, two, H, K, 1))
        with np.errstate(invalid="ignore", over="ignore"):  # a damaged scale: found by verify, not warned about
            return torch.from_numpy(q.astype(np.float32) * s.astype(np.float32)).to(dtype)
    raise BankError(f"unknown KV codec {codec!r} in the bank")
