"""The memory reader's attention forms side by side on this machine's CPU: closed book (the fused
kernel over the context alone), explicit (`reader_attention`), merged (`merged_reader_attention`)
and the doubled-head SDPA form, at the shapes of SmolLM2-135M's layers (9 query heads, 3 KV
heads, head dim 64, a 3-token sink), with each form's largest difference from the explicit one.

    .venv/bin/python bench/reader_attention.py
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from m3cli.attention import merged_reader_attention, reader_attention

H, HKV, D, P = 9, 3, 64, 3
CASES = (  # (batch, tokens in the call, context keys, memory keys, chunks whose memories the call reads)
    (8, 64, 64, 80, 1),  # the first 64-token block of a batch-8 prefill
    (8, 64, 256, 80, 1),  # the last block
    (1, 256, 256, 320, 4),  # a 256-token prompt of batch 1 in one call (4 chunks x 5 memories x 16)
    (8, 1, 300, 80, 1),  # a decoding step
)


def timed(f, n: int = 20) -> float:
    for _ in range(3):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    torch.manual_seed(0)
    print(
        "| batch | tokens | context keys | memory keys | closed book ms | explicit ms | merged ms | doubled ms | max diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for B, T, ctx, M, chunks in CASES:
        N = P + M + ctx
        q, dq = torch.randn(B, H, T, D), torch.randn(B, H, T, D) * 0.1
        k, v = torch.randn(B, HKV, N, D), torch.randn(B, HKV, N, D)
        bias = -torch.rand(B, H, M)
        causal = torch.ones(T, ctx, dtype=torch.bool).tril(ctx - T)
        reads = torch.arange(T)[:, None] * chunks // T == torch.arange(M)[None] * chunks // M  # each token its chunk's
        mask = torch.cat([torch.ones(T, P, dtype=torch.bool), reads, causal], -1)[None, None].expand(B, 1, T, N)
        mask = mask if T > 1 else None
        gate = torch.zeros(N, 1)
        gate[P : P + M] = 1

        def doubled():
            row = torch.zeros(B, H, 1, N)
            row[..., P : P + M] = bias[:, :, None]
            m = row if mask is None else torch.where(mask, row, float("-inf"))
            qq = torch.cat([q, dq], -1) * math.sqrt(2.0)
            return F.scaled_dot_product_attention(
                qq, torch.cat([k, k * gate], -1), torch.cat([v, v * gate], -1), attn_mask=m, enable_gqa=True
            )[..., :D]

        with torch.inference_mode():
            want = reader_attention(q, dq, k, v, mask, P, P + M, bias=bias)[0]
            diff = max(
                float((merged_reader_attention(q, dq, k, v, mask, P, P + M, bias=bias)[0] - want).abs().max()),
                float((doubled() - want).abs().max()),
            )
            closed_mask = causal[None, None] if T > 1 else None
            closed = timed(
                lambda: F.scaled_dot_product_attention(
                    q, k[:, :, P + M :], v[:, :, P + M :], attn_mask=closed_mask, enable_gqa=True
                )
            )
            explicit = timed(lambda: reader_attention(q, dq, k, v, mask, P, P + M, bias=bias))
            merged = timed(lambda: merged_reader_attention(q, dq, k, v, mask, P, P + M, bias=bias))
            dbl = timed(doubled)
        print(f"| {B} | {T} | {ctx} | {M} | {closed:.2f} | {explicit:.2f} | {merged:.2f} | {dbl:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
