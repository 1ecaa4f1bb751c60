"""Product quantization (PQ) of memory vectors: the `vq` KV codec.

Each d-dim key or value vector is cut into M sub-vectors of d/M dims; each sub-vector is
replaced by the index (one byte) of its nearest centroid among 256 learned for that
sub-space. Codebooks are learned per memory layer and per keys/values by k-means on a sample
of the bank's own vectors, and stored in the bank as a plain float32 array (no serialized
objects to trust). The code layout is that of faiss.ProductQuantizer with nbits=8.

Pure tensor math; knows nothing about files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CENTROIDS = 256
TRAIN_VECTORS = 8192  # per (layer, keys|values): 32 per centroid
ITERATIONS = 10


def default_subquantizers(head_dim: int) -> int:
    """d/4 sub-spaces (4 dims, 1 byte each: 8x smaller than bf16), or fewer if d/4 is not whole."""
    for m in (head_dim // 4, head_dim // 2, head_dim):
        if m >= 1 and head_dim % m == 0:
            return m
    return head_dim


def kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Batched Lloyd k-means: x (S, n, s) -> centroids (S, k, s) for S independent sub-spaces."""
    S, n, s = x.shape
    pick = torch.randint(0, n, (k,), generator=generator) if n < k else torch.randperm(n, generator=generator)[:k]
    centroids = x[:, pick.to(x.device)].clone()  # (S, k, s)
    for _ in range(iterations):
        assign = assign_codes(x, centroids)  # (S, n)
        sums = torch.zeros(S, k, s, dtype=x.dtype, device=x.device).scatter_add_(
            1, assign[..., None].expand(-1, -1, s), x
        )
        counts = torch.zeros(S, k, dtype=x.dtype, device=x.device).scatter_add_(
            1, assign, torch.ones(S, n, dtype=x.dtype, device=x.device)
        )
        empty = counts == 0
        centroids = torch.where(empty[..., None], centroids, sums / counts.clamp_min(1)[..., None])
    return centroids


def assign_codes(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per sub-vector: x (S, n, s), centroids (S, k, s) -> (S, n) long.
    Works in blocks so that the distance matrix stays under ~64 MB."""
    S, n, _ = x.shape
    k = centroids.shape[1]
    c2 = (centroids * centroids).sum(-1)[:, None, :]  # (S, 1, k)
    out = torch.empty(S, n, dtype=torch.long, device=x.device)
    block = max(1, (16 << 20) // max(1, S * k))
    for a in range(0, n, block):
        xb = x[:, a : a + block]
        d2 = c2 - 2 * xb @ centroids.transpose(1, 2)  # |x|^2 does not change the argmin
        out[:, a : a + block] = d2.argmin(-1)
    return out


def train(sample: torch.Tensor, m: int, seed: int = 0, progress=None) -> torch.Tensor:
    """sample (L, 2, n, d) float -> codebooks (L, 2, m, 256, d/m) float32 (on sample's device)."""
    L, two, n, d = sample.shape
    g = torch.Generator().manual_seed(seed)
    books = []
    for part in sample.float().reshape(L * two, n, d):  # one (layer, keys|values) at a time
        sub = part.reshape(n, m, d // m).transpose(0, 1).contiguous()  # (m, n, d/m)
        books.append(kmeans(sub, CENTROIDS, ITERATIONS, g))
        if progress:
            progress()
    return torch.stack(books).reshape(L, two, m, CENTROIDS, d // m)


def encode(kv: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """kv (n, L, 2, H, K, d) -> codes (n, L, 2, H, K, m) uint8, by FAISS's ProductQuantizer
    (fused nearest-centroid search in C++) loaded with these codebooks."""
    import faiss
    import numpy as np

    n, L, two, H, K, d = kv.shape
    m = codebooks.shape[2]
    x = kv.float().cpu().permute(1, 2, 0, 3, 4, 5).reshape(L, two, n * H * K, d).numpy()
    codes = np.empty((L, two, n * H * K, m), dtype=np.uint8)
    for layer in range(L):
        for t in range(two):
            pq = faiss.ProductQuantizer(d, m, 8)
            faiss.copy_array_to_vector(codebooks[layer, t].cpu().float().numpy().reshape(-1), pq.centroids)
            codes[layer, t] = pq.compute_codes(np.ascontiguousarray(x[layer, t]))
    return torch.from_numpy(codes).reshape(L, two, n, H, K, m).permute(2, 0, 1, 3, 4, 5).contiguous()


def encode_reference(kv: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The same codes by brute force in torch: the definition `encode` is tested against."""
    n, L, two, H, K, d = kv.shape
    m, sub = codebooks.shape[2], codebooks.shape[4]
    x = kv.float().reshape(n, L, two, H * K, m, sub).permute(1, 2, 4, 0, 3, 5).reshape(L * two * m, n * H * K, sub)
    codes = assign_codes(x, codebooks.reshape(L * two * m, CENTROIDS, sub))  # (L*2*m, n*H*K)
    return codes.reshape(L, two, m, n, H, K).permute(3, 0, 1, 4, 5, 2).to(torch.uint8)


def decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """codes (n, L, 2, H, K, m) uint8 -> kv (n, L, 2, H, K, d) float32."""
    n, L, two, H, K, m = codes.shape
    sub = codebooks.shape[4]
    book = codebooks.reshape(L * two * m * CENTROIDS, sub)
    base = torch.arange(L * two * m, device=codes.device).reshape(L, two, 1, 1, m) * CENTROIDS  # (L, 2, 1, 1, m)
    flat = codes.long() + base  # (n, L, 2, H, K, m)
    return F.embedding(flat, book).reshape(n, L, two, H, K, m * sub)  # a gather; 10x faster than book[flat]
