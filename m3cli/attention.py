"""Attention kernels, explicit-memory containers, the context KV cache and masks.

Pure tensor math. `attention_reference` is the one reference implementation; the SDPA
path is a faster route tested against it. Knows nothing about tokenizers, files, banks or
retrieval: memories arrive as tensors in a `Memory`, already selected and encoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Plain softmax attention with grouped-query heads, computed in float32.

    q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv; mask broadcastable to
    (B, H, T, S): bool (True = may attend) or float (added to the logits; -inf = may not
    attend, as SDPA reads it). A row with no visible key returns zeros.
    Returns (B, H, T, D) in q's dtype.
    """
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(group, dim=1)
    scores = masked_logits(q.float() @ k.float().transpose(-1, -2) / math.sqrt(D), mask)  # (B, H, T, S)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:  # fully masked rows: softmax gives NaN, define them as zero
        probs = torch.where(torch.isfinite(scores).any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return (probs @ v.float()).to(q.dtype)


def masked_logits(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Attention logits with a mask applied: a bool mask hides keys (-inf where False), a float
    mask is added (its -inf entries hide keys, finite ones bias them)."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.to(scores.dtype)


_CUDNN_SDPA_OFF = False


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The same function through torch's fused scaled_dot_product_attention.

    Callers guarantee every row sees at least one key (a token always sees itself).
    On CUDA the cuDNN backend is switched off (once, process-wide): it builds a new execution
    plan for every new key length, ~8 ms each on an H100, and decoding meets a new length at
    every step (measured: 49 ms vs 4.8 ms per step, small preset). Flash/efficient kernels remain;
    with a mask, grouped KV heads are expanded first (`expand_kv_heads`). One query token in
    bfloat16/float16 on a CPU takes `attention_one_query`.
    """
    global _CUDNN_SDPA_OFF
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return attention_one_query(q, k, v, mask)
    if q.is_cuda and not _CUDNN_SDPA_OFF:
        torch.backends.cuda.enable_cudnn_sdp(False)
        _CUDNN_SDPA_OFF = True
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # SDPA adds a float mask of the query's dtype
    if q.is_cuda and mask is not None and q.shape[1] != k.shape[1]:
        k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def attention_one_query(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """`attention_sdpa` for one query token (a decoding step) in bfloat16 or float16 on a CPU:
    two grouped products and a float32 softmax. torch's fused CPU kernel is slow there (measured,
    2-core EPYC, 9 query and 3 KV heads of 64, 300 cached keys: 123 us against 54 at batch 1, 829
    against 118 at batch 8); in float32, or for more than one query token, it is the faster one.
    The keys are the left operand (keys x queries): a view of the KV cache's buffer multiplied as
    the transposed right operand is first copied whole in these dtypes. The logits are rounded to
    the dtype before the softmax, as eager attention does."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    logits = k @ (q * (1.0 / math.sqrt(D))).reshape(B, Hkv, H // Hkv, D).mT  # (B, Hkv, S, g)
    return _one_query_out(logits, v, mask, H)[1]


def _one_query_out(logits: Tensor, v: Tensor, mask: Tensor | None, H: int) -> tuple[Tensor, Tensor]:
    """(probs, softmax(logits) @ v) for one query token's logits laid out keys x queries
    (B, Hkv, S, g), mask as `attention_reference` reads it: probs (B, Hkv, g, S) float32, the
    output (B, H, 1, D) in v's dtype."""
    B, Hkv, S = logits.shape[:3]
    g, T = H // Hkv, 1
    if mask is not None and mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    by_key = logits.view(B, Hkv, S, g, T).permute(0, 1, 3, 4, 2)  # (B, Hkv, g, T, S), a view
    if mask is not None:
        by_key = masked_logits(by_key, mask[:, :, None] if mask.shape[1] == 1 else mask.unflatten(1, (Hkv, g)))
    probs = torch.softmax(by_key, dim=-1, dtype=torch.float32).reshape(B, Hkv, g * T, S)
    return probs, (probs.to(v.dtype) @ v).view(B, H, T, v.shape[3])


def reader_attention_one_query(
    q: Tensor,
    dq: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    start: int,
    end: int,
    bias: Tensor | None = None,
    memory: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`reader_attention`'s (out, mem, probs) for one query token (a decoding step) on a CPU, laid
    out keys x queries as `attention_one_query`, with the reader's own products in float32 (mem
    and the probabilities (B, H, 1, keys) come back in float32, out in v's dtype): memory =
    float32 copies (keys, values) (B, Hkv, end - start, D) of the memory keys (`Front.float_memory`,
    made once per memory rather than once per step), or None to use k's and v's. In bfloat16 a
    small product costs ~13-27 us on this CPU however small, in float32 ~3-12 (measured: batch 1,
    400 keys, 80 of them memories: 88 us against 129 for `reader_attention`; batch 8: 200
    against 309)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    g, scale = H // Hkv, 1.0 / math.sqrt(D)
    km, vm = memory if memory is not None else (k[:, :, start:end].float(), v[:, :, start:end].float())
    logits = (k @ (q * scale).reshape(B, Hkv, g, D).mT).float()  # (B, Hkv, keys, g), a new tensor
    logits[:, :, start:end] += km @ (dq.float() * scale).reshape(B, Hkv, g, D).mT
    if bias is not None:  # (B, H, M): the same for the group's query heads' columns
        logits[:, :, start:end] += bias.float().view(B, Hkv, g, end - start).mT
    probs, out = _one_query_out(logits, v, mask, H)
    mem = probs[..., start:end] @ vm  # (B, Hkv, g, D)
    return out, mem.view(B, H, 1, D), probs.view(B, H, 1, -1)


def expand_kv_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, n_heads, S, D), each KV head repeated for its group of query heads.

    On CUDA, SDPA with a mask and grouped heads (enable_gqa) has no fused kernel: flash takes no
    mask and the memory-efficient kernel no grouped heads, so it falls back to the math form,
    which multiplies in float32 (found in the H200 reader run's profile: 22% of GPU time in a
    float32 GEMM). With the heads expanded the memory-efficient kernel runs, in bf16."""
    B, Hkv, S, D = x.shape
    if Hkv == n_heads:
        return x
    return x[:, :, None].expand(B, Hkv, n_heads // Hkv, S, D).reshape(B, n_heads, S, D)


ATTENTION_IMPLS = {"reference": attention_reference, "sdpa": attention_sdpa}


def reader_attention(
    q: Tensor,
    dq: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    start: int,
    end: int,
    probe: bool = False,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attention of a layer whose memory reader reads (`M3Config.memory_reader_rank`), computed
    explicitly: keys start..end-1 (the memories) are scored with q + dq, every other key with q;
    one softmax over all keys.

    q, dq: (B, H, T, D); k, v: (B, Hkv, N, D); mask as `attention_reference` reads it (callers
    guarantee every row sees a key); bias (B, H, end - start) or None: added to the memory keys'
    logits for every query token (the retriever-score prior). Returns (out, mem, probs): out (B, H, T, D) the attention
    output over all values, mem (B, H, T, D) what the memory values alone contribute, probs
    (B, H, T, N) float32 when `probe`, else None. The same function as the doubled-head form
    ([q | dq] . [k | k on memory keys]) without copying the keys and values into doubled width,
    which a decoding step would otherwise do for its whole cache in every layer. In bf16 the
    logits are rounded to bf16 before the float32 softmax, as eager attention does elsewhere
    (the fused kernel keeps them in float32).
    """
    B, H, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g = H // Hkv  # the query heads of one KV head sit together (h = kv * g + j), as repeat_interleave
    scale = 1.0 / math.sqrt(D)
    logits = ((q * scale).reshape(B, Hkv, g * T, D) @ k.transpose(-1, -2)).float()  # (B, Hkv, g*T, N)
    if end > start:  # in place: a product's backward does not need its output
        logits[..., start:end] += ((dq.to(q.dtype) * scale).reshape(B, Hkv, g * T, D) @ k[:, :, start:end].mT).float()
        if bias is not None:  # rows are (head in group, token): the bias broadcasts over tokens
            logits.view(B, Hkv, g, T, N)[..., start:end] += bias.float().reshape(B, Hkv, g, 1, end - start)
    logits = masked_logits(logits.view(B, H, T, N), mask)
    probs = torch.softmax(logits, dim=-1)
    pv = probs.to(v.dtype).view(B, Hkv, g * T, N)
    out = (pv @ v).view(B, H, T, D)
    mem = (pv[..., start:end] @ v[:, :, start:end]).view(B, H, T, D)
    return out, mem, probs if probe else None


# torch's fused CPU attention kernel, which also returns each row's log-sum-exp (the public
# scaled_dot_product_attention does not); None where this build lacks it or predates 2.9 (before
# it, the kernel indexed keys by query head: grouped-query attention read past the keys)
_FLASH_CPU = (
    getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if torch.torch_version.TorchVersion(torch.__version__) >= "2.9"
    else None
)
MERGED_MAX_TOKENS = 512  # longer calls: its float mask over the front keys grows with tokens x memories


def _fused_cpu_ready(q: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """q (B, H, T, D) on a CPU with the fused kernel, in one of `dtypes`, at most MERGED_MAX_TOKENS
    tokens, without gradients (the kernel's log-sum-exp has none)."""
    return (
        _FLASH_CPU is not None
        and q.device.type == "cpu"
        and q.dtype in dtypes
        and q.shape[2] <= MERGED_MAX_TOKENS
        and not torch.is_grad_enabled()
    )


def merged_reader_available(q: Tensor) -> bool:
    """Whether `merged_reader_attention` can run for q (B, H, T, D): float32 on a CPU, with the
    fused kernel, at most MERGED_MAX_TOKENS tokens, without gradients (the kernel's log-sum-exp
    has none; in bfloat16 the sink's correction would be rounded)."""
    return _fused_cpu_ready(q, (torch.float32,))


def aligned_reader_available(q: Tensor) -> bool:
    """Whether `aligned_reader_attention` can run for q (B, H, T, D): as `merged_reader_available`,
    in bfloat16 too (no sink correction to round: the sink is read with q in a call of its own)."""
    return _fused_cpu_ready(q, (torch.float32, torch.bfloat16))


def merged_reader_attention(
    q: Tensor, dq: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, start: int, end: int, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`reader_attention`'s (out, mem) through two calls of the fused CPU kernel, merged by their
    log-sum-exps: the context keys (from `end` on) with q, and the front keys (the sink, 0..start-1,
    and the memories, start..end-1) with q + dq, where the sink's logits are brought back to q's
    by an additive mask of -dq.k (computed explicitly: a few keys) and the memories' carry `bias`.
    What the sink's values contribute is taken back out of the front call's output to leave `mem`.
    Nothing is copied and no (T, keys) logits over the context are held: at a 64-token block of
    batch 8 it costs about half the explicit form (inference only: `merged_reader_available`)."""
    assert _FLASH_CPU is not None
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    dtype, ninf, scale = q.dtype, float("-inf"), 1.0 / math.sqrt(q.shape[-1])
    ctx_mask = None if mask is None else q.new_zeros(mask[..., end:].shape).masked_fill_(~mask[..., end:], ninf)
    out_c, lse_c = _FLASH_CPU(q, k[:, :, end:], v[:, :, end:], attn_mask=ctx_mask)
    # the front call's additive mask (B, H, T, end): -dq.k on the sink, the bias on the memories
    front_mask = q.new_zeros((B, H, T, end))
    if start:
        sink_k = k[:, :, :start]
        front_mask[..., :start] = (
            -(dq.to(dtype) * scale).reshape(B, Hkv, g * T, D).matmul(sink_k.mT).view(B, H, T, start)
        )
    if bias is not None:
        front_mask[..., start:end] += bias[:, :, None, :].to(dtype)
    if mask is not None:
        front_mask.masked_fill_(~mask[..., :end], ninf)
    qf = q + dq.to(dtype)
    out_f, lse_f = _FLASH_CPU(qf, k[:, :, :end], v[:, :, :end], attn_mask=front_mask)
    if mask is not None:  # a row that sees no front key reads nothing from it, whatever the kernel gives
        seen = mask[..., :end].any(-1)
        lse_f = lse_f.masked_fill(~seen, ninf)
        out_f = torch.where(seen[..., None], out_f, 0)
    lse = torch.logaddexp(lse_c, lse_f)
    out_f = out_f * torch.exp(lse_f - lse)[..., None].to(dtype)  # the front's share of the output
    mem = out_f
    if start:  # take the sink's part back out: its probabilities are exp(q.k / sqrt(D) - lse)
        sink_logits = (q * scale).reshape(B, Hkv, g * T, D).matmul(sink_k.mT).view(B, H, T, start).float()
        if mask is not None:
            sink_logits = sink_logits.masked_fill(~mask[..., :start], ninf)
        p_sink = torch.exp(sink_logits - lse[..., None]).to(dtype).view(B, Hkv, g * T, start)
        mem = out_f - (p_sink @ v[:, :, :start]).view(B, H, T, D)
    return torch.addcmul(out_f, out_c, torch.exp(lse_c - lse)[..., None].to(dtype)), mem


def aligned_reader_attention(
    q: Tensor,
    dq: Tensor | None,
    k: Tensor,
    v: Tensor,
    start: int,
    end: int,
    chunk: int,
    bias: Tensor | None = None,
    key_ok: Tensor | None = None,
    slot_keys: int = 0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A prompt's attention from its first token when memory is chunk-aligned: token t's chunk is
    t // `chunk`, every chunk reads its own equal share of the memory keys (start..end-1, in chunk
    order), each chunk has a real key in every head (`key_ok` (B, 1 or Hkv, end-start): which are;
    None: all) and every token reads memory (so sees the sink, 0..start-1). Three
    calls of the fused CPU kernel, merged by their log-sum-exps, none with a (tokens x keys) mask:
    the context (from `end` on, exactly these T tokens) causally with q; the sink with q; and the
    memories with q + dq (q in a layer without a reader: dq None), the chunks batched as rows so
    each reads only its own keys, `bias` (B, H, end-start) added to their logits. Returns (out,
    mem, share): mem is what the memories contribute (None without dq); with `slot_keys` (the keys
    of one memory slot: a chunk's keys are its slots' in order), share (B, T, slots) is the share of
    attention each slot got from each token, averaged over the heads (0 for other chunks' slots),
    as `reader_attention`'s probabilities give it: the memory keys' logits are computed explicitly
    (a chunk's tokens x its own keys only) against the merged log-sum-exp; else None. Runs where
    `aligned_reader_available` says (float32 or bfloat16: the kernel gives float32 log-sum-exps,
    merged in float32; the shares are computed in float32)."""
    assert _FLASH_CPU is not None
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[2] - end != T:
        raise ValueError("aligned_reader_attention reads a prompt from its first token (no cached context)")
    out_c, lse_c = _FLASH_CPU(q, k[:, :, end:], v[:, :, end:], is_causal=True)
    parts = [(out_c, lse_c)]
    if start:
        parts.append(_FLASH_CPU(q, k[:, :, :start], v[:, :, :start]))
    cite = None
    if end > start:
        n = -(-T // chunk)  # chunks, the last one possibly short
        chunk = T if n == 1 else chunk  # one short chunk: no padded rows
        per = (end - start) // n
        if per * n != end - start:
            raise ValueError(f"{end - start} memory keys do not split evenly over {n} chunks")
        qf = q if dq is None else q + dq.to(q.dtype)
        if n * chunk != T:
            qf = F.pad(qf, (0, 0, 0, n * chunk - T))
        qf = qf.view(B, H, n, chunk, D).transpose(1, 2).reshape(B * n, H, chunk, D)
        kf = k[:, :, start:end].reshape(B, Hkv, n, per, D).transpose(1, 2).reshape(B * n, Hkv, per, D)
        vf = v[:, :, start:end].reshape(B, Hkv, n, per, D).transpose(1, 2).reshape(B * n, Hkv, per, D)
        mask = None  # the same for every token of a chunk: broadcast over them
        if bias is not None or key_ok is not None:
            heads = H if bias is not None or (key_ok is not None and key_ok.shape[1] > 1) else 1
            mask = q.new_zeros((B, heads, end - start)) if bias is None else bias.to(q.dtype)
            if key_ok is not None:
                ok = key_ok if key_ok.shape[1] == 1 else key_ok.repeat_interleave(H // Hkv, dim=1)
                mask = mask.masked_fill(~ok, float("-inf"))
            mask = mask.reshape(B, heads, n, 1, per).transpose(1, 2).reshape(B * n, heads, 1, per)
        out_f, lse_f = _FLASH_CPU(qf, kf, vf, attn_mask=mask)
        out_f = out_f.view(B, n, H, chunk, D).transpose(1, 2).reshape(B, H, n * chunk, D)[:, :, :T]
        lse_f = lse_f.view(B, n, H, chunk).transpose(1, 2).reshape(B, H, n * chunk)[:, :, :T]
        parts.append((out_f, lse_f))
        if slot_keys:
            cite = (qf, kf, mask, n, chunk, per)
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    share = None if cite is None else _aligned_slot_share(lse, *cite, slot_keys)
    shares = [(o, torch.exp(part_lse - lse)[..., None].to(q.dtype)) for o, part_lse in parts]
    out = shares[0][0] * shares[0][1]
    for o, w in shares[1:]:
        out = torch.addcmul(out, o, w)
    mem = shares[-1][0] * shares[-1][1] if dq is not None and end > start else None  # the reader's output path
    return out, mem, share


def _aligned_slot_share(
    lse: Tensor, qf: Tensor, kf: Tensor, mask: Tensor | None, n: int, chunk: int, per: int, slot_keys: int
) -> Tensor:
    """`aligned_reader_attention`'s share of attention per memory slot (B, T, n * slots per chunk):
    each chunk's tokens' probabilities over its own memory keys, exp(logit - lse) with lse (B, H, T)
    the log-sum-exp over every key the token sees, summed per slot and averaged over the heads."""
    B, H, T = lse.shape
    Hkv, D = kf.shape[1], kf.shape[3]
    g, m = H // Hkv, per // slot_keys
    if n * chunk != T:
        lse = F.pad(lse, (0, n * chunk - T))
    lse = lse.view(B, H, n, chunk).transpose(1, 2).reshape(B * n, H, chunk, 1)
    # exp(q.k / sqrt(D) + mask - lse) in two passes over the (tokens x keys) block: one product
    # added onto (mask - lse), then exp in place (at batch 8 a third of the time of separate steps)
    base = (-lse if mask is None else mask - lse).expand(B * n, H, chunk, per).reshape(B * n * Hkv, g * chunk, per)
    qf, kf = qf.to(base.dtype), kf.to(base.dtype)  # float32 (the kernel's log-sum-exp is)
    probs = torch.baddbmm(
        base, qf.reshape(B * n * Hkv, g * chunk, D), kf.reshape(B * n * Hkv, per, D).mT, alpha=1 / math.sqrt(D)
    ).exp_()
    mass = probs.view(B * n, H, chunk, m, slot_keys).sum(-1).mean(1).view(B, n, chunk, m)
    share = lse.new_zeros((B, n, chunk, n, m))
    for c in range(n):  # chunk c's tokens read only chunk c's slots
        share[:, c, :, c] = mass[:, c]
    return share.view(B, n * chunk, n * m)[:, :T]


@dataclass
class MemoryEncoding:
    """Explicit memories of R references, as produced by the memory encoder.

    kv:        (R, L, 2, Hkv, k, D)  post-RoPE keys [.., 0] and values [.., 1] of the selected
                                      tokens, L = number of memory layers
    valid:     (R, L, Hkv, k) bool    False where a reference had fewer than k candidate tokens
    positions: (R, L, Hkv, k) long    absolute position of each selected token (prefix length +
                                      index in the reference); -1 where not valid
    """

    kv: Tensor
    valid: Tensor
    positions: Tensor

    def __len__(self) -> int:
        return self.kv.shape[0]


@dataclass
class Memory:
    """The explicit memories one forward call may read.

    kv:      (B, S, L, 2, Hkv, k, D)  S memory slots per sequence (one reference each)
    valid:   (B, S, L, Hkv, k) bool   which selected tokens are real (padding slots: all False)
    sink:    (n_layers, 2, Hkv, p, D) KV of the reference prefix, the attention sink placed in
                                      front of the memories at every layer (`encode_prefix`)
    visible: (B, T, S) bool or None   query token t may read slot s; None = every token reads
                                      every slot (one chunk, e.g. a decoding step)
    scores:  (B, S) float or None     each slot's retriever score minus the best score of the
                                      chunk that retrieved it (<= 0; 0 for empty slots), read by
                                      a model with the retriever-score prior
                                      (`M3Config.memory_score_prior`); None = no scores (the
                                      prior then adds nothing)

    A query token that sees no valid memory sees no sink either, so an empty memory is the
    same as no memory.
    """

    kv: Tensor
    valid: Tensor
    sink: Tensor
    visible: Tensor | None = None
    scores: Tensor | None = None
    # per-model caches; a caller that knows may preset "readable" (bool) and "valid_flags"
    # ((every memory layer and head has the same real keys, all keys are real)) to spare the host syncs
    prepared: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_slots(self) -> int:
        return self.kv.shape[1]

    def readable(self) -> bool:
        """True when some query token may read some real memory token (computed once: asking
        the GPU each decoding step would stall the pipeline)."""
        if "readable" not in self.prepared:
            if self.n_slots == 0:
                ok = False
            else:
                slot_has = self.valid.flatten(2).any(-1)  # (B, S)
                if self.visible is None:
                    ok = bool(slot_has.any())
                else:
                    ok = bool((self.visible & slot_has.to(self.visible.device)[:, None, :]).any())
            self.prepared["readable"] = ok
        return self.prepared["readable"]

    @classmethod
    def from_encodings(
        cls, per_sequence: list[MemoryEncoding], sink: Tensor, visible: Tensor | None = None
    ) -> "Memory":
        """Stack each sequence's references into slots, padding with empty slots."""
        S = max((len(e) for e in per_sequence), default=0)
        B = len(per_sequence)
        ref = next((e for e in per_sequence if len(e)), None)
        if ref is None:  # no memory at all: zero slots
            hkv, d = sink.shape[2], sink.shape[4]
            kv = sink.new_zeros((B, 0, 1, 2, hkv, 1, d))
            valid = torch.zeros((B, 0, 1, hkv, 1), dtype=torch.bool, device=sink.device)
            return cls(kv=kv, valid=valid, sink=sink, visible=visible)
        kv = ref.kv.new_zeros((B, S) + tuple(ref.kv.shape[1:]))
        valid = torch.zeros((B, S) + tuple(ref.valid.shape[1:]), dtype=torch.bool, device=ref.kv.device)
        for b, e in enumerate(per_sequence):
            kv[b, : len(e)] = e.kv
            valid[b, : len(e)] = e.valid
        return cls(kv=kv, valid=valid, sink=sink, visible=visible)


def score_gaps(refs, scores) -> Tensor:
    """`Memory.scores` from retrievals: each slot's retriever score minus the best of its chunk's.

    refs (B, chunks, k) reference ids (-1 = empty slot), scores (B, chunks, k) their scores
    (tensors or arrays). Returns (B, chunks * k) float32, 0 for empty slots."""
    refs, scores = torch.as_tensor(refs), torch.as_tensor(scores, dtype=torch.float32)
    real = refs >= 0
    best = scores.masked_fill(~real, float("-inf")).amax(dim=-1, keepdim=True)
    gaps = torch.where(real, scores - best.nan_to_num(0.0, neginf=0.0), torch.zeros(()))
    return gaps.reshape(refs.shape[0], -1)


def chunk_visibility(token_chunk: Tensor, slot_chunk: Tensor, window: int) -> Tensor:
    """Which memory slots each token may read, as one tensor expression (no loop over chunks).

    token_chunk: (B, T) or (T,) chunk index of each query token.
    slot_chunk:  (B, S) chunk index that retrieved each slot; -1 marks an empty slot.
    window:      a token of chunk c reads slots of chunks c-window..c (training: 4; inference: 0).
    Returns (B, T, S) bool.
    """
    if token_chunk.dim() == 1:
        token_chunk = token_chunk.unsqueeze(0).expand(slot_chunk.shape[0], -1)
    d = token_chunk[:, :, None] - slot_chunk[:, None, :]  # (B, T, S)
    return (d >= 0) & (d <= window) & (slot_chunk[:, None, :] >= 0)


def training_visibility(
    seq_len: int, n_slots_per_chunk: int, batch: int, chunk_length: int, window: int, device: torch.device | str = "cpu"
) -> Tensor:
    """The training block mask: chunk c reads the memories of chunks c-window..c.

    Slots are laid out chunk by chunk: slot s belongs to chunk s // n_slots_per_chunk.
    Returns (batch, seq_len, n_chunks * n_slots_per_chunk) bool.
    """
    n_chunks = -(-seq_len // chunk_length)
    token_chunk = torch.arange(seq_len, device=device) // chunk_length  # (T,)
    slot_chunk = torch.arange(n_chunks * n_slots_per_chunk, device=device) // n_slots_per_chunk
    return chunk_visibility(token_chunk, slot_chunk.unsqueeze(0).expand(batch, -1), window)


class Front:
    """The keys and values one layer places before the context: the sink, then (a memory layer)
    every slot's k tokens, slot by slot — (B, Hkv, p + S*k, D) each once built.

    Kept as its parts: a KV cache writes them straight into its front region (`KVCache.update`;
    one converting copy into memory the cache already holds, where building them first would
    page-fault a fresh buffer of tens of MB at each new memory), and a call without a cache
    builds them once (`tensors`, differentiable).

    sink: (2, Hkv, p, D); mem: (B, S, 2, Hkv, k, D) of any dtype (a bank's bfloat16 memories
    are converted on the way) or None; batch: B; dtype: what the keys and values are built in.
    """

    def __init__(self, sink: Tensor, mem: Tensor | None, batch: int, dtype: torch.dtype) -> None:
        self.sink, self.mem, self.batch, self.dtype = sink, mem, batch, dtype
        self.n_sink = sink.shape[2]
        self.length = self.n_sink + (0 if mem is None else mem.shape[1] * mem.shape[4])
        self._built: tuple[Tensor, Tensor] | None = None
        self._float: tuple[Tensor, Tensor] | None = None

    def _mem(self, i: int) -> Tensor:
        """Keys (i=0) or values (i=1) of the memories: (B, Hkv, S*k, D), a view when it can be."""
        assert self.mem is not None
        m = self.mem[:, :, i]  # (B, S, Hkv, k, D)
        return m.permute(0, 2, 1, 3, 4).flatten(2, 3)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """(keys, values) (B, Hkv, p + S*k, D) in `dtype`, built once."""
        if self._built is None:
            out = []
            for i in (0, 1):
                s = self.sink[i].to(self.dtype)[None].expand(self.batch, -1, -1, -1)
                out.append(s if self.mem is None else torch.cat([s, self._mem(i).to(self.dtype)], dim=2))
            self._built = (out[0], out[1])
        return self._built

    def float_memory(self) -> tuple[Tensor, Tensor]:
        """The memories' keys and values (B, Hkv, S*k, D) as float32 copies, made once: what
        `reader_attention_one_query` multiplies each decoding step in a reduced-precision model."""
        assert self.mem is not None
        if self._float is None:
            k, v = (self._mem(i).to(torch.float32, memory_format=torch.contiguous_format) for i in (0, 1))
            self._float = (k, v)
        return self._float

    def write(self, k: Tensor, v: Tensor) -> None:
        """Write the keys and values into k, v (B, Hkv, length, D), converting as they go."""
        p = self.n_sink
        for i, dst in ((0, k), (1, v)):
            dst[:, :, :p] = self.sink[i]
            if self.mem is not None:
                dst[:, :, p:].unflatten(2, (self.mem.shape[1], self.mem.shape[4])).copy_(
                    self.mem[:, :, i].permute(0, 2, 1, 3, 4)
                )


class KVCache:
    """Context keys/values per layer, post-RoPE, in preallocated buffers (B, Hkv, capacity, D).

    Holds only the context. The keys placed before it (the prefix sink and the memories of the
    current chunk, `front`) live in a reserved region at the start of the same buffer, so a
    decoding step reads [front | context] as one view without copying the cache, and changing
    the memories rewrites only the front region: the context is never recomputed.
    """

    def __init__(self, n_layers: int) -> None:
        self._k: list[Tensor | None] = [None] * n_layers
        self._v: list[Tensor | None] = [None] * n_layers
        self._reserve = [0] * n_layers  # slots kept for the front region
        self._front = [0] * n_layers  # front length currently written
        self._front_src: list[object] = [None] * n_layers  # the `Front` last written there
        self._len = [0] * n_layers

    @property
    def length(self) -> int:
        return self._len[0]

    def context(self, layer: int) -> tuple[Tensor, Tensor]:
        """All context keys/values of `layer` seen so far, (B, Hkv, length, D) views."""
        r, n = self._reserve[layer], self._len[layer]
        kb, vb = self._k[layer], self._v[layer]
        assert kb is not None and vb is not None, "no keys cached for this layer yet"
        return kb[:, :, r : r + n], vb[:, :, r : r + n]

    def _grow(self, layer: int, k: Tensor, need_ctx: int, need_front: int) -> None:
        buf = self._k[layer]
        reserve = max(self._reserve[layer], need_front)
        cap = 0 if buf is None else buf.shape[2] - self._reserve[layer]
        if buf is not None and need_ctx <= cap and reserve == self._reserve[layer]:
            return
        new_cap = max(need_ctx, 2 * cap, 64)
        B, H, _, D = k.shape
        new_k = k.new_empty((B, H, reserve + new_cap, D))
        new_v = k.new_empty((B, H, reserve + new_cap, D))
        if buf is not None:
            old_k, old_v = self.context(layer)
            n = self._len[layer]
            new_k[:, :, reserve : reserve + n] = old_k
            new_v[:, :, reserve : reserve + n] = old_v
        self._k[layer], self._v[layer] = new_k, new_v
        self._reserve[layer] = reserve
        self._front_src[layer], self._front[layer] = None, 0  # the front is rewritten below

    def update(self, layer: int, k: Tensor, v: Tensor, front: Front | None = None) -> tuple[Tensor, Tensor]:
        """Append this call's keys/values (B, Hkv, T, D) for `layer`; return [front | context so far].

        front: the keys/values to place before the context (or None for none), written into the
        front region when it differs from the last one written there.
        """
        n, T = self._len[layer], k.shape[2]
        f = 0 if front is None else front.length
        self._grow(layer, k, n + T, f)
        r = self._reserve[layer]
        kb, vb = self._k[layer], self._v[layer]
        assert kb is not None and vb is not None  # _grow allocated them
        kb[:, :, r + n : r + n + T] = k
        vb[:, :, r + n : r + n + T] = v
        self._len[layer] = n + T
        if front is not None and f and self._front_src[layer] is not front:
            front.write(kb[:, :, r - f : r], vb[:, :, r - f : r])
            self._front_src[layer] = front
        self._front[layer] = f
        return kb[:, :, r - f : r + n + T], vb[:, :, r - f : r + n + T]
