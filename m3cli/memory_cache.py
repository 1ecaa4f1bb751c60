"""Decoded memories on the model's device: the bank read through an LRU cache, so a reference
used again costs nothing (generation re-retrieves every 64 tokens and neighbours repeat)."""

from __future__ import annotations

import ctypes
import os
import sys
from collections import OrderedDict

import torch

from .errors import M3Error


# --- memories: bank -> LRU cache -> Memory ---------------------------------------------------
class MemoryCache:
    """Decoded memories of recently used references, on the model's device, least recently
    used evicted first. `get` decodes all missing references of a call in one bank read.

    A bf16 bank's memories are kept as stored (bfloat16: exact, half the bytes of float32 and no
    conversion on load); they are converted where a layer reads them (`attention.Front`).
    Other codecs are kept in the model's dtype."""

    def __init__(self, bank, device: torch.device, dtype: torch.dtype, capacity: int = 4096) -> None:
        self.bank, self.device, self.capacity = bank, device, capacity
        self.dtype = torch.bfloat16 if getattr(bank, "codec", None) == "bf16" else dtype
        self._items: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, refs: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        missing = sorted({r for r in refs if r not in self._items})
        self.hits += len(refs) - sum(1 for r in refs if r in missing)
        self.misses += len(missing)
        if missing:
            enc = self.bank.memories(missing, device=self.device, dtype=self.dtype)
            lo, hi = torch.aminmax(enc.kv)  # NaN and ±inf show in the extremes (one pass, no temporaries)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                raise M3Error(
                    f"{self.bank.path}: a retrieved memory holds values that are not finite numbers "
                    "(the file is damaged; see m3 inspect --verify)"
                )
            for j, r in enumerate(missing):  # clones: a view would keep the whole decoded batch alive
                self._items[r] = (enc.kv[j].clone(), enc.valid[j].clone())
        out = []
        for r in refs:
            self._items.move_to_end(r)
            out.append(self._items[r])
        while len(self._items) > max(self.capacity, len(set(refs))):
            self._items.popitem(last=False)
        return out

    def stack(self, per_sequence: list[list[int | None]], n_slots: int, shape) -> tuple:
        """(kv (B, S, ...), valid (B, S, ...)) with sequence b's references in its first slots
        (None, and slots past a sequence's references: empty, all zero and invalid)."""
        B = len(per_sequence)
        L, two, H, K, D = shape
        flat = [r for refs in per_sequence for r in refs if r is not None]
        got = iter(self.get(flat))
        empty = None
        kvs, valids = [], []
        for refs in per_sequence:
            row = list(refs) + [None] * (n_slots - len(refs))
            for r in row:
                if r is None:
                    if empty is None:
                        empty = (
                            torch.zeros((L, two, H, K, D), dtype=self.dtype, device=self.device),
                            torch.zeros((L, H, K), dtype=torch.bool, device=self.device),
                        )
                    kv, ok = empty
                else:
                    kv, ok = next(got)
                kvs.append(kv)
                valids.append(ok)
        if not kvs:
            return (
                torch.zeros((B, n_slots, L, two, H, K, D), dtype=self.dtype, device=self.device),
                torch.zeros((B, n_slots, L, H, K), dtype=torch.bool, device=self.device),
            )
        kv = torch.stack(kvs).view(B, n_slots, L, two, H, K, D)
        return kv, torch.stack(valids).view(B, n_slots, L, H, K)


_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse (once per process, Linux only).

    By default glibc serves every block over a (dynamic) threshold with its own mmap and returns
    freed memory to the system, so the tens of MB a batch's memories, masks and activations take
    are page-faulted anew by every call: a batch-8 memory load took 0.23 s in a call after other
    work against 0.025 s right after the same call. Blocks up to 32 MB then come from the heap,
    and up to 1 GB of freed heap is kept. Skipped where the user set MALLOC_* variables or glibc
    malloc tunables, preloads another allocator, or sets M3_KEEP_FREED_MEMORY=0. Returns whether
    it was applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or os.environ.get("M3_KEEP_FREED_MEMORY") == "0":
        return False
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30) and mallopt(M_TOP_PAD, 64 << 20)
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED
