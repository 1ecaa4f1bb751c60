"""The Memory3 model: a Llama-family decoder whose memory layers read explicit memories,
and the memory encoder that turns references into sparse key/values.

Pure tensor math: tensors in, tensors out. Knows nothing about files, tokenizers, banks,
retrieval, devices chosen by the user, accelerate or the CLI. Positions follow DESIGN §3.4:
reference prefix 0..p-1, memories inside [p, p+reference_length), context from
p+reference_length on, whether or not memory is read.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import (
    ATTENTION_IMPLS,
    Front,
    KVCache,
    Memory,
    MemoryEncoding,
    aligned_reader_attention,
    aligned_reader_available,
    attention_sdpa,
    masked_logits,
    merged_reader_attention,
    merged_reader_available,
    reader_attention,
    reader_attention_one_query,
)
from .config import M3Config

# The retriever-score prior's unit: the retriever scores (cosines) of a chunk's hits differ by
# ~0.001-0.1, so in thousandths a gap is logit-sized at gains of ~0.01-0.1, and Adam's steps
# (about the learning rate each) move the prior as fast as it pays off (measured on the proof's
# task: a unit of 100 learned half as fast and read 5 memories at 0.836, 1000 at 0.884).
SCORE_UNIT = 1000.0

# How a layer whose memory reader reads computes attention: "split" (`reader_attention`: explicit,
# copies nothing, materialises the (T, keys) logits), "merged" (`merged_reader_attention`: two
# calls of the fused CPU kernel merged by their log-sum-exps; CPU inference only), "doubled" (one
# fused SDPA call over doubled heads, which copies the keys and values into doubled width) or
# "auto": merged for a call of several tokens where it can run (a prompt's prefill on a CPU: about
# half the split form's time at a 64-token block of batch 8, a little under the doubled form's at
# one 256-token call); else split for calls of at most SPLIT_MAX_TOKENS tokens (decoding, where
# the doubled form would copy the whole cache in every layer at every step; a single token is
# faster split than merged), doubled for the rest (training: the fused kernel never holds the logits).
# Under "auto", a prompt read from its first token with chunk-aligned memory (`Memory.prepared
# ["aligned"]`, set by the generator) goes through `aligned_reader_attention` in every layer.
READER_ATTENTION = "auto"
SPLIT_MAX_TOKENS = 64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for positions (T,) or (B, T): (..., T, head_dim), angles in float64."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by the (T, D) or (B, T, D) tables; half-split convention as in HF Llama."""
    if cos.dim() == 3:  # per-sequence positions
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: M3Config, reader_rank: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.reader_rank = 0
        if reader_rank:
            self.add_reader(reader_rank)

    def add_reader(self, rank: int) -> None:
        """The memory reader (`M3Config.memory_reader_rank`): a query delta that only memory keys
        see, mem_q_b @ mem_q_a @ x, and an output path that only memory values feed,
        mem_o_b @ mem_o_a @ (their attention-weighted sum). The b factors start at zero, so
        the layer computes exactly what it did without them until training moves them."""
        hidden, width = self.q_proj.in_features, self.n_heads * self.head_dim
        device = self.q_proj.weight.device
        self.reader_rank = rank
        self.mem_q_a = nn.Parameter(torch.randn(rank, hidden, device=device) * hidden**-0.5)
        self.mem_q_b = nn.Parameter(torch.zeros(width, rank, device=device))
        self.mem_o_a = nn.Parameter(torch.randn(rank, width, device=device) * width**-0.5)
        self.mem_o_b = nn.Parameter(torch.zeros(hidden, rank, device=device))

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        attn_fn,
        extra_kv: Front | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        capture: dict | None = None,
        probe: tuple | None = None,
        n_sink: int = 0,
        mem_bias: Tensor | None = None,
        aligned: int = 0,
        key_ok: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, C). extra_kv: keys/values placed before the context (sink, memories).

        n_sink: how many of extra_kv's keys are the sink; the rest are memories, which the
        memory reader (if the layer has one) reads through its own query and output deltas.
        mask covers [extra | cached context | this call's tokens] (None: every key visible).
        `capture`, when given, receives the pre-RoPE q/k and the post-RoPE k and v of this
        call's tokens. `probe` = (out, start, slots, k): append to `out` the share of attention
        (B, T, slots) that each memory slot's k keys, starting at key `start`, received.
        mem_bias (B, H, memory keys): added to the logits of the memory keys (the retriever-score
        prior, `Memory3Model.score_bias`), the same for every query token.
        aligned: the chunk length when the call is a prompt from its first token whose chunks each
        read their own memories (`aligned_reader_attention`, which also gives `probe`'s shares;
        mask is then None, and key_ok (B, 1 or Hkv, memory keys) says which memory keys are real,
        None: all).
        """
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)  # (B, Hkv, T, D)
        if capture is not None:
            capture["q"], capture["k"] = q, k
        n_front = 0 if extra_kv is None else extra_kv.length
        reads = self.reader_rank > 0 and n_front > n_sink  # this call reads memories
        # a decoding step of a bfloat16 model on a CPU: the reader's small products run in float32
        # (`_reader_float`, `reader_attention_one_query`), where each costs a quarter as much
        lowp_step = (
            T == 1
            and x.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float16)
            and not torch.is_grad_enabled()
        )
        if reads:  # q, the query delta and k rotated by one call (fewer small kernels per decoding step)
            if lowp_step:
                qa, qb = self._reader_float("q")
                dq = F.linear(F.linear(x.float(), qa), qb).to(x.dtype)
            else:
                dq = F.linear(F.linear(x, self.mem_q_a), self.mem_q_b)
            dq = dq.view(B, T, self.n_heads, D).transpose(1, 2)
            q, dq, k = apply_rope(torch.cat([q, dq, k], dim=1), cos, sin).split(
                [self.n_heads, self.n_heads, self.n_kv_heads], dim=1
            )
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if capture is not None:
            capture["k_rope"], capture["v"] = k, v
        if cache is not None:
            k, v = cache.update(layer, k, v, front=extra_kv)
        elif extra_kv is not None:
            fk, fv = extra_kv.tensors()
            k = torch.cat([fk.to(k.dtype), k], dim=2)
            v = torch.cat([fv.to(v.dtype), v], dim=2)
        if aligned:
            out, mem_out, share = aligned_reader_attention(
                q,
                dq if reads else None,
                k,
                v,
                n_sink,
                n_front,
                aligned,
                mem_bias,
                key_ok,
                0 if probe is None else probe[3],
            )
            if probe is not None and share is not None:
                probe[0].append(share)
            return self._project(out, mem_out)
        form = READER_ATTENTION
        if form == "merged" and not merged_reader_available(q):
            raise ValueError("the merged reader attention runs on a CPU in float32, without gradients")
        if form == "auto":
            if T > 1 and probe is None and attn_fn is attention_sdpa and merged_reader_available(q):
                form = "merged"
            else:
                form = "split" if T <= SPLIT_MAX_TOKENS else "doubled"
        if mem_bias is not None and not (reads and form in ("split", "merged")):  # a float mask carries it
            mask = with_key_bias(mask, mem_bias.to(q.dtype), n_sink, k.shape[2])
            mem_bias = None
        if reads and form == "merged":  # two fused kernel calls, no copies (`merged_reader_attention`)
            out, mem = merged_reader_attention(q, dq, k, v, mask, n_sink, n_front, bias=mem_bias)
        elif reads and form == "split" and lowp_step:  # mem comes back in float32
            memory = extra_kv.float_memory() if extra_kv is not None else None
            out, mem, one_probs = reader_attention_one_query(q, dq, k, v, mask, n_sink, n_front, mem_bias, memory)
            if probe is not None:
                self._probe(one_probs, probe)
        elif reads and form == "split":  # explicitly, no doubled copy of the keys and values (`reader_attention`)
            out, mem, probs = reader_attention(
                q, dq, k, v, mask, n_sink, n_front, probe=probe is not None, bias=mem_bias
            )
            if probe is not None and probs is not None:
                self._probe(probs, probe)
        if reads and form in ("split", "merged"):
            return self._project(out, mem)
        if reads:
            # one attention call over doubled heads: [q | dq] . [k | k on memory keys, else 0] is
            # q.k for the sink and the context and (q + dq).k for memories; the second half of
            # [v | v on memory keys] is what the memories alone contribute. The factor sqrt(2)
            # keeps the kernels' 1/sqrt(head width) scale at 1/sqrt(D).
            gate = torch.zeros(k.shape[2], 1, dtype=k.dtype, device=k.device)
            gate[n_sink:n_front] = 1
            q = torch.cat([q, dq.to(q.dtype)], dim=-1) * math.sqrt(2.0)  # (B, H, T, 2D)
            k = torch.cat([k, k * gate], dim=-1)  # (B, Hkv, S, 2D)
            v = torch.cat([v, v * gate], dim=-1)
        scale = math.sqrt(q.shape[-1])
        if probe is not None:
            scores = q.float() @ k.float().repeat_interleave(self.n_heads // self.n_kv_heads, dim=1).transpose(-1, -2)
            self._probe(torch.softmax(masked_logits(scores / scale, mask), dim=-1), probe)
        out = attn_fn(q, k, v, mask)  # (B, H, T, D), or (B, H, T, 2D) when the reader reads
        if reads:
            mem = out[..., D:].transpose(1, 2).reshape(B, T, self.n_heads * D)
            out = out[..., :D]
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * D))
        if reads:
            y = y + F.linear(F.linear(mem, self.mem_o_a), self.mem_o_b)
        return y

    def _project(self, out: Tensor, mem: Tensor | None) -> Tensor:
        """The output projection of out (B, H, T, D), plus the reader's output path of what the
        memories contributed, mem (B, H, T, D): o_proj(out) + mem_o_b @ mem_o_a @ mem, in one addmm."""
        B, H, T, D = out.shape
        y = self.o_proj(out.transpose(1, 2).reshape(B * T, H * D))
        if mem is None:
            return y.view(B, T, -1)
        mem = mem.transpose(1, 2).reshape(B * T, H * D)
        if mem.dtype != y.dtype:  # float32 from `reader_attention_one_query`: the path in float32 too
            oa, ob = self._reader_float("o")
            return (y + F.linear(F.linear(mem, oa), ob).to(y.dtype)).view(B, T, -1)
        mem = F.linear(mem, self.mem_o_a)  # (B*T, rank)
        return torch.addmm(y, mem, self.mem_o_b.T).view(B, T, -1)

    def _reader_float(self, which: str) -> tuple[Tensor, Tensor]:
        """float32 copies of the reader's query factors (`which` "q": mem_q_a, mem_q_b) or output
        factors ("o": mem_o_a, mem_o_b), made per call (~1 us each at rank 16; a cache would have
        to notice every way weights change). For a reduced-precision model's decoding steps on a
        CPU (no gradients), where the query delta's two products cost ~27 us in bfloat16 and ~6 in
        float32."""
        a, b = (self.mem_q_a, self.mem_q_b) if which == "q" else (self.mem_o_a, self.mem_o_b)
        return a.detach().float(), b.detach().float()

    def _probe(self, probs: Tensor, probe: tuple) -> None:
        """Append the share of attention (B, T, slots) each memory slot got, from probs (B, H, T, keys)."""
        out_list, start, slots, k_top = probe
        B, H, T, _ = probs.shape
        mass = probs.nan_to_num(0.0)[..., start : start + slots * k_top].reshape(B, H, T, slots, k_top).sum(-1)
        out_list.append(mass.mean(1))


def with_key_bias(mask: Tensor | None, bias: Tensor, start: int, n_keys: int) -> Tensor:
    """A float mask: `bias` (B, H, M) added to keys start..start+M-1 for every query token, the
    bool `mask` (broadcastable to (B, H, T, n_keys); None = all visible) as 0 / -inf elsewhere."""
    B, H, M = bias.shape
    row = bias.new_zeros((B, H, 1, n_keys))
    row[..., start : start + M] = bias[:, :, None, :]
    if mask is None:
        return row
    return torch.where(mask, row, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))


class MLP(nn.Module):
    def __init__(self, cfg: M3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: M3Config, reader_rank: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, reader_rank)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, attn_fn, **kw) -> Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin, mask, attn_fn, **kw)
        return h + self.mlp(self.mlp_norm(h))


class Memory3Model(nn.Module):
    """Decoder LM with explicit memory.

    forward(input_ids, memory=None, cache=None) -> logits (B, T, vocab)
    encode_prefix() -> the sink KV (n_layers, 2, Hkv, p, D)
    encode_references(ids, lengths) -> MemoryEncoding for each reference
    """

    def __init__(self, cfg: M3Config, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.config = cfg
        self.attn_impl = attn_impl
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, cfg.memory_reader_rank if i in cfg.mem_layers else 0) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if not self.embed.weight.is_meta:  # on meta (loading a model dir) there is nothing to fill
            self.apply(self._init_weights)
        if cfg.memory_score_prior:
            self.memory_score_gain = nn.Parameter(torch.zeros(cfg.n_mem_layers, cfg.n_heads))

    @property
    def config(self) -> M3Config:
        return self._config

    @config.setter
    def config(self, cfg: M3Config) -> None:
        """Replacing the config (e.g. `m3 pretrain --memory-layers`) re-derives which layers read
        memory, so training reads the layers the saved config names."""
        self._config = cfg
        self._mem_index = {layer: i for i, layer in enumerate(cfg.mem_layers)}

    def enable_score_prior(self) -> bool:
        """Give the model the retriever-score prior (`M3Config.memory_score_prior`) with zero
        gains, which leaves its outputs as they were until training moves them. Returns False
        when it already has it."""
        if self.config.memory_score_prior:
            return False
        self.config = self.config.replace(memory_score_prior=True)
        self.memory_score_gain = nn.Parameter(
            torch.zeros(self.config.n_mem_layers, self.config.n_heads, device=self.embed.weight.device)
        )
        return True

    def enable_reader(self, rank: int) -> bool:
        """Give every memory layer the memory reader (`M3Config.memory_reader_rank`) with zero
        output factors, which leaves the model's outputs as they were until training moves them.
        Returns False when it already has one of that rank."""
        if self.config.memory_reader_rank == rank:
            return False
        if self.config.memory_reader_rank:
            raise ValueError(f"the model already has a memory reader of rank {self.config.memory_reader_rank}")
        self.config = self.config.replace(memory_reader_rank=rank)
        for i in self.config.mem_layers:
            self.layers[i].attn.add_reader(rank)  # type: ignore[union-attr,operator]
        return True

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    @property
    def attn_fn(self):
        return ATTENTION_IMPLS[self.attn_impl]

    def output_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # --- ordinary forward, with or without memory ------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        memory: Memory | None = None,
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        return_hidden: bool = False,
        key_mask: Tensor | None = None,
        last_only: bool = False,
        attention_probe: list | None = None,
        segment_ids: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or final hidden states if return_hidden.

        memory: explicit memories read by the memory layers (see `Memory`); None or an empty
        memory gives the plain causal LM. cache: context KV cache, extended in place.
        position_ids (T,) or (B, T): override the default context positions (left-padded
        batches, tests). key_mask (B, past+T) bool: False marks padding in the context, which
        no token attends to. last_only: logits of the last position only (B, 1, vocab).
        attention_probe: a list that receives, per memory layer, the share of attention each
        memory slot got, (B, T, slots) — for citations; costs an explicit softmax (read
        chunk-aligned: only each chunk's tokens x its own memory keys).
        segment_ids (B, T): packed training rows; a token attends only to earlier tokens of its
        own segment (no cache, no key_mask).
        rope: the (cos, sin) tables `rope_cos_sin` gives for these positions in the embeddings'
        dtype, computed by the caller (a compiled training step takes them as inputs: inside the
        graph the compiler recomputed them, in float64, in every layer's kernels).
        """
        B, T = input_ids.shape
        cfg = self.config
        past = cache.length if cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device) + cfg.context_offset  # (T,)
        h = self.embed(input_ids)
        if rope is None:
            rope = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)
        cos, sin = rope
        if segment_ids is not None:
            if cache is not None or key_mask is not None:
                raise ValueError("segment_ids cannot be combined with a cache or a key_mask")
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            ctx: Tensor | None = (torch.ones(T, T, dtype=torch.bool, device=device).tril()[None] & same)[:, None]
        else:
            ctx = self._context_mask(B, T, past, key_mask, device)  # (B|1, 1, T, past+T) or None
        if memory is not None and not memory.readable():
            memory = None  # an empty memory, or one no token may read, is no memory
        attn_fn = self.attn_fn
        if memory is None:
            for i, layer in enumerate(self.layers):
                h = layer(h, cos, sin, ctx, attn_fn, cache=cache, layer=i)
        else:
            plan = self.reads_aligned(memory, T, h.dtype, device, past, key_mask)
            aligned = memory.prepared["aligned"] if plan else 0
            if aligned:  # no masks: each attention call sees exactly its keys
                prep = self.prepare_memory(memory, h.dtype)
                extra, masks = prep["extra"], (lambda i: None)

                def ok(i: int) -> Tensor | None:  # which memory keys are real: all, the same, or per layer
                    if prep["all_real"]:
                        return None
                    return prep["shared_ok"] if prep["shared_ok"] is not None else prep["key_ok"][i]

            else:
                extra, masks = self._memory_plan(memory, ctx, B, T, past, h.dtype)
            bias = self.score_bias(memory)  # (n_mem_layers, B, H, S*k) or None
            S, k_top, p = memory.n_slots, memory.kv.shape[5], memory.sink.shape[3]
            for i, layer in enumerate(self.layers):
                m = self._mem_index.get(i)
                probe = (attention_probe, p, S, k_top) if m is not None and attention_probe is not None else None
                h = layer(
                    h,
                    cos,
                    sin,
                    masks(i),
                    attn_fn,
                    extra_kv=extra[i],
                    cache=cache,
                    layer=i,
                    probe=probe,
                    n_sink=p,
                    mem_bias=None if bias is None or m is None else bias[m],
                    aligned=aligned,
                    key_ok=None if not aligned or m is None else ok(i),
                )
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        if return_hidden:
            return h
        return F.linear(h, self.output_weight())

    def reads_aligned(
        self,
        memory: Memory,
        T: int,
        dtype: torch.dtype,
        device,
        past: int = 0,
        key_mask: Tensor | None = None,
    ) -> bool:
        """Whether a call can read `memory` through `aligned_reader_attention`: the caller marked
        it chunk-aligned (`memory.prepared["aligned"]` = chunk length: token t reads only chunk
        t // length's slots, every chunk the same number), the prompt starts here (no cached
        context, no padding), every slot has a real key in every layer and head, and the fused CPU
        kernel runs (`aligned_reader_available`). A probe (citations) is answered there too."""
        if not memory.prepared.get("aligned") or past or key_mask is not None:
            return False
        like = torch.empty((1, 1, T, 0), dtype=dtype, device=device)
        if READER_ATTENTION != "auto" or self.attn_fn is not attention_sdpa or not aligned_reader_available(like):
            return False
        if "slots_real" not in memory.prepared:  # one host sync per memory
            memory.prepared["slots_real"] = bool(memory.valid.any(-1).all())
        return memory.prepared["slots_real"]

    @staticmethod
    def _context_mask(B: int, T: int, past: int, key_mask: Tensor | None, device) -> Tensor | None:
        """Causal mask over the context, with padding keys hidden; None when every key is visible
        (one new token and no padding). A token always sees itself, so no row is empty."""
        if key_mask is None and T == 1:
            return None
        causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)  # (T, past+T)
        if key_mask is None:
            return causal[None, None]
        if key_mask.shape != (B, past + T):
            raise ValueError(f"key_mask must be (B, past+T) = ({B}, {past + T}), got {tuple(key_mask.shape)}")
        itself = torch.arange(past + T, device=device)[None] == (past + torch.arange(T, device=device))[:, None]
        return ((causal[None] & key_mask.to(device)[:, None, :]) | itself[None])[:, None]

    def prepare_memory(self, memory: Memory, dtype: torch.dtype) -> dict:
        """The per-layer keys/values placed before the context (`Front`s, built where they are
        read), made once per `Memory` and kept on it: non-memory layers get [sink], memory layers
        [sink | slot 0's k tokens | …]. Also which memory keys are real, per memory layer:
        (B, Hkv, S*k) bool."""
        key = ("prepared", dtype)
        if key in memory.prepared:
            return memory.prepared[key]
        cfg = self.config
        B, S = memory.kv.shape[:2]
        k_top = memory.kv.shape[5]
        extra, key_ok = [], {}
        for layer in range(cfg.n_layers):
            m = self._mem_index.get(layer)
            # [sink] or [sink | slot 0's k tokens | …], built where they are read (`Front`)
            extra.append(Front(memory.sink[layer], None if m is None else memory.kv[:, :, m], B, dtype))
            if m is not None:
                key_ok[layer] = memory.valid[:, :, m].permute(0, 2, 1, 3).reshape(B, cfg.n_kv_heads, S * k_top)
        # whether every memory layer and head has the same real keys, and whether all are real: one
        # host sync, none when the caller knows (`Memory.prepared["valid_flags"]`, a trainer's)
        flags = memory.prepared.get("valid_flags")
        if flags is None:
            first = memory.valid[:, :, :1, :1]
            flags = tuple(torch.stack([(memory.valid == first).all(), first.all()]).tolist())
        uniform, all_real = flags
        shared = next(iter(key_ok.values()))[:, :1] if uniform and key_ok else None  # (B, 1, S*k)
        prepared = {
            "extra": extra,
            "key_ok": key_ok,
            "shared_ok": shared,
            "all_real": shared is not None and all_real,
        }
        memory.prepared[key] = prepared
        return prepared

    def _memory_plan(self, memory: Memory, ctx: Tensor | None, B: int, T: int, past: int, dtype: torch.dtype):
        """(extra_kv per layer, mask for layer i) for a call that reads memory.

        Memory layers attend to [sink | memories | context], the others to [sink | context].
        A row that reads no memory sees no sink. When every key is visible the mask is None.
        Masks are bool; the retriever-score prior's bias (`score_bias`) travels beside them
        (`Attention.forward`'s mem_bias), so a mask is built once per call, not once per layer.
        """
        cfg = self.config
        prep = self.prepare_memory(memory, dtype)
        extra = prep["extra"]
        S, k_top, p = memory.n_slots, memory.kv.shape[5], memory.sink.shape[3]
        device = memory.kv.device
        if memory.visible is None and prep["all_real"] and ctx is None:
            return extra, lambda i: None  # one decoding step reading real memories, no padding
        group = cfg.n_heads // cfg.n_kv_heads
        slot_has = memory.valid.flatten(2).any(-1).to(device)  # (B, S)
        if memory.visible is None:
            visible = slot_has[:, None, :].expand(B, T, S)  # (B, T, S)
        else:
            visible = memory.visible.to(device) & slot_has[:, None, :]
        sink_rows = visible.any(-1)  # (B, T)
        sink_mask = sink_rows[:, None, :, None].expand(B, 1, T, p)
        if ctx is None:
            ctx = torch.ones(1, 1, T, past + T, dtype=torch.bool, device=device)
        ctx = ctx.expand(B, 1, T, past + T)
        plain = torch.cat([sink_mask, ctx], dim=-1)  # (B, 1, T, p+past+T)
        vis = visible.repeat_interleave(k_top, dim=-1)[:, None]  # (B, 1, T, S*k)
        shared = None
        if prep["shared_ok"] is not None:
            shared = torch.cat([sink_mask, vis & prep["shared_ok"][:, :, None, :], ctx], dim=-1)  # (B, 1, T, keys)

        def masks(layer: int) -> Tensor | None:
            if layer not in self._mem_index:
                return plain
            if shared is not None:
                return shared
            mem = (vis & prep["key_ok"][layer][:, :, None, :]).repeat_interleave(group, dim=1)  # (B, H, T, S*k)
            return torch.cat([sink_mask.expand(B, cfg.n_heads, T, p), mem, ctx.expand(B, cfg.n_heads, T, -1)], dim=-1)

        return extra, masks

    def score_bias(self, memory: Memory) -> Tensor | None:
        """The retriever-score prior's logit bias on each memory key: (n_mem_layers, B, H, S*k),
        gain[layer, head] * SCORE_UNIT * memory.scores[b, slot]; None without the prior or
        without scores."""
        if not self.config.memory_score_prior or memory.scores is None:
            return None
        k_top = memory.kv.shape[5]
        gaps = memory.scores.to(self.memory_score_gain.device, torch.float32)  # (B, S)
        bias = self.memory_score_gain.float()[:, None, :, None] * SCORE_UNIT * gaps[None, :, None, :]  # (L, B, H, S)
        return bias.repeat_interleave(k_top, dim=-1)

    # --- the reference prefix (attention sink) ---------------------------------------------
    def encode_prefix(self) -> Tensor:
        """KV of the reference prefix at positions 0..p-1 in every layer: (n_layers, 2, Hkv, p, D)."""
        ids = self._prefix_ids(1)
        p = ids.shape[1]
        positions = torch.arange(p, device=ids.device)
        mask = torch.ones(p, p, dtype=torch.bool, device=ids.device).tril()
        captures = self._run_captured(ids, positions, mask, range(self.config.n_layers))
        return torch.stack([torch.stack([c["k_rope"][0], c["v"][0]]) for c in captures])

    def _prefix_ids(self, batch: int) -> Tensor:
        prefix = self.config.reference_prefix_ids
        if not prefix:
            raise ValueError(
                "this model has no reference prefix (config.reference_prefix_ids is empty); "
                "it is set from the tokenizer when a model dir is created"
            )
        return torch.tensor(prefix, device=self.embed.weight.device).unsqueeze(0).expand(batch, -1)

    def _run_captured(self, ids: Tensor, positions: Tensor, mask: Tensor, layers, on_layer=None) -> list[dict]:
        """Run layers 0..max(layers) over ids; capture q/k/v of the listed layers."""
        layers = set(layers)
        h = self.embed(ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        captures = []
        for i, layer in enumerate(self.layers[: max(layers) + 1]):
            capture: dict | None = {} if i in layers else None
            h = layer(h, cos, sin, mask, self.attn_fn, capture=capture)
            if capture is not None:
                if on_layer is not None:
                    on_layer(i, capture)  # consume now, keep nothing
                else:
                    captures.append(capture)
        return captures

    # --- the memory encoder ------------------------------------------------------------------
    def encode_references(self, ref_ids: Tensor, lengths: Tensor, top_k: int | None = None) -> MemoryEncoding:
        """Encode R references into sparse explicit memories.

        ref_ids (R, N): reference tokens without the prefix, right-padded, N <= reference_length.
        lengths (R,): real token counts. Each reference is read as [prefix, reference] in one
        causal pass. Per memory layer and KV head, the top_k tokens by the total attention they
        receive from all reference tokens (exact softmax over prefix + reference keys, no causal
        mask, no RoPE, summed over the query heads of the group) are kept; prefix and padding are
        never selected. Returns their post-RoPE keys, values and positions.
        """
        cfg = self.config
        k_top = cfg.memory_top_k if top_k is None else top_k
        R, N = ref_ids.shape
        if N > cfg.reference_length:
            raise ValueError(f"references are limited to {cfg.reference_length} tokens, got {N}")
        if lengths.shape != (R,) or bool((lengths < 1).any()) or bool((lengths > N).any()):
            raise ValueError(f"lengths must be R={R} values in 1..{N}, got {lengths.tolist()}")
        device = ref_ids.device
        prefix = self._prefix_ids(R)
        p = prefix.shape[1]
        ids = torch.cat([prefix, ref_ids], dim=1)  # (R, p+N)
        L = p + N
        positions = torch.arange(L, device=device)
        real = torch.arange(L, device=device)[None] < (p + lengths.to(device))[:, None]  # (R, L) non-padding
        is_ref = real.clone()
        is_ref[:, :p] = False  # (R, L) reference tokens: queries of the score, candidates
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        mask = (causal[None] & real[:, None, :])[:, None]  # (R, 1, L, L); padding rows still see the prefix
        kk = min(k_top, L)
        kv_out, valid_out, pos_out = [], [], []

        def select(_layer: int, c: dict) -> None:
            q, k = c["q"].float(), c["k"].float()  # pre-RoPE (R, H, L, D), (R, Hkv, L, D)
            group = q.shape[1] // k.shape[1]
            scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (R, H, L, L)
            scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1) * is_ref[:, None, :, None]  # only reference queries count
            received = probs.sum(dim=2)  # (R, H, L)
            received = received.view(R, k.shape[1], group, L).sum(dim=2)  # (R, Hkv, L)
            if cfg.memory_selection == "attention_x_value_norm":
                received = received * c["v"].float().norm(dim=-1)  # (R, Hkv, L): what a token contributes
            received = received.masked_fill(~is_ref[:, None, :], float("-inf"))
            top, idx = received.topk(kk, dim=-1)  # (R, Hkv, kk)
            ok = torch.isfinite(top)
            order = torch.where(ok, idx, L + idx).argsort(dim=-1)  # selected tokens by position
            idx, ok = idx.gather(-1, order), ok.gather(-1, order)
            if kk < k_top:  # fewer tokens than k: pad with invalid entries
                pad = k_top - kk
                idx = F.pad(idx, (0, pad))
                ok = F.pad(ok, (0, pad), value=False)
            gidx = idx[..., None].expand(-1, -1, -1, q.shape[-1])  # (R, Hkv, k, D)
            sel_k = c["k_rope"].gather(2, gidx) * ok[..., None]
            sel_v = c["v"].gather(2, gidx) * ok[..., None]
            kv_out.append(torch.stack([sel_k, sel_v], dim=1))  # (R, 2, Hkv, k, D)
            valid_out.append(ok)
            pos_out.append(torch.where(ok, idx, torch.full_like(idx, -1)))

        self._run_captured(ids, positions, mask, cfg.mem_layers, on_layer=select)
        return MemoryEncoding(
            kv=torch.stack(kv_out, dim=1), valid=torch.stack(valid_out, dim=1), positions=torch.stack(pos_out, dim=1)
        )

    # --- bookkeeping -------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n
