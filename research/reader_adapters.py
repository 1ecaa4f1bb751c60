"""Which adapter teaches a frozen pretrained model (SmolLM2-135M) to read explicit memory?

Experiment code (issue #22), not part of the package. Memories are encoded once by the frozen
model (top-K by score, kept in score order so smaller K are prefixes), retrieval (MiniLM, top-5)
is done once, then each variant trains for a fixed number of steps on chat questions about
training entities and is scored on held-out entities: teacher-forced exact answers (every token
of the value argmax-correct) with 5 retrieved memories, against closed book.

    python research/reader_adapters.py prep --task out/reader --out out/ra --entities 2000
    python research/reader_adapters.py train --prep out/ra --variant memkv --steps 150 --k 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m3cli.attention import Memory  # noqa: E402
from m3cli.checkpoint import load_model_dir, load_tokenizer  # noqa: E402
from m3cli.corpus import reference_ids  # noqa: E402
from m3cli.model import apply_rope, rope_cos_sin, with_key_bias  # noqa: E402


def read_jsonl(p):
    return [json.loads(x) for x in Path(p).read_text().splitlines() if x.strip()]


# --- memories in score order --------------------------------------------------------------
@torch.no_grad()
def encode_scored(model, ids_list, K, selection):
    cfg = model.config
    R = len(ids_list)
    N = max(len(x) for x in ids_list)
    ref = torch.zeros(R, N, dtype=torch.long)
    for j, x in enumerate(ids_list):
        ref[j, :len(x)] = torch.tensor(x)
    lengths = torch.tensor([len(x) for x in ids_list])
    prefix = model._prefix_ids(R)
    p = prefix.shape[1]
    ids = torch.cat([prefix, ref], 1)
    L = p + N
    positions = torch.arange(L)
    real = positions[None] < (p + lengths)[:, None]
    is_ref = real.clone()
    is_ref[:, :p] = False
    mask = (torch.ones(L, L, dtype=torch.bool).tril()[None] & real[:, None, :])[:, None]
    kk = min(K, L - p)
    kv_out, pos_out = [], []

    def select(_l, c):
        q, k = c["q"].float(), c["k"].float()
        group = q.shape[1] // k.shape[1]
        s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~real[:, None, None, :], float("-inf"))
        probs = torch.softmax(s, -1) * is_ref[:, None, :, None]
        rec = probs.sum(2).view(R, k.shape[1], group, L).sum(2)
        if selection == "attention_x_value_norm":
            rec = rec * c["v"].float().norm(dim=-1)
        rec = rec.masked_fill(~is_ref[:, None, :], float("-inf"))
        top, idx = rec.topk(kk, -1)  # score order
        ok = torch.isfinite(top)
        idx = torch.where(ok, idx, torch.zeros_like(idx))
        g = idx[..., None].expand(-1, -1, -1, q.shape[-1])
        sk = c["k_rope"].gather(2, g) * ok[..., None]
        sv = c["v"].gather(2, g) * ok[..., None]
        kv_out.append(torch.stack([sk, sv], 1))
        pos_out.append(torch.where(ok, idx, torch.full_like(idx, -1)))

    model._run_captured(ids, positions, mask, cfg.mem_layers, on_layer=select)
    kv = torch.stack(kv_out, 1)  # (R, L, 2, Hkv, kk, D)
    pos = torch.stack(pos_out, 1)  # (R, L, Hkv, kk)
    if kk < K:
        kv = F.pad(kv, (0, 0, 0, K - kk))
        pos = F.pad(pos, (0, K - kk), value=-1)
    return kv.half(), pos.short()


def prep(a):
    from m3cli.embed import load_embedder

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model_dir(a.model, "cpu", torch.float32).eval()
    if a.layers == "all":
        model.config = model.config.replace(memory_layers=tuple(range(model.config.n_layers)))
    tok = load_tokenizer(a.model)
    kb = read_jsonl(Path(a.task) / "kb.jsonl")
    ents_kb = [d for d in kb if not d["id"].startswith("wiki:")][: a.entities]
    titles = {d["title"] for d in ents_kb}
    heldq = [q for q in read_jsonl(Path(a.task) / "entities.jsonl") if q["title"] in titles]
    train = [x for x in read_jsonl(Path(a.task) / "train.jsonl") if x.get("title") in titles and "prompt" in x]
    print(f"{len(ents_kb)} refs, {len(train)} training questions, {len(heldq)} held-out questions", flush=True)
    ids = [reference_ids(tok, d["text"])[:128] for d in ents_kb]
    t0 = time.time()
    kvs, poss = [], []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(ids), 32):
        batch = order[s:s + 32]
        kv, pos = encode_scored(model, [ids[i] for i in batch], a.K, a.selection)
        kvs.append((batch, kv, pos))
        if s % 640 == 0:
            print(f"encoded {s + len(batch)} in {time.time() - t0:.0f} s", flush=True)
    KV = torch.zeros((len(ids),) + tuple(kvs[0][1].shape[1:]), dtype=torch.float16)
    POS = torch.zeros((len(ids),) + tuple(kvs[0][2].shape[1:]), dtype=torch.int16)
    for batch, kv, pos in kvs:
        KV[batch], POS[batch] = kv, pos
    sink = model.encode_prefix()
    emb = load_embedder("minilm")
    E = np.concatenate([emb.embed([d["text"] for d in ents_kb[s:s + 64]]) for s in range(0, len(ents_kb), 64)])

    def retrieve(qs):
        Q = np.concatenate([emb.embed(qs[s:s + 64]) for s in range(0, len(qs), 64)])
        S = Q @ E.T
        top = np.argsort(-S, 1)[:, :5]
        return top, np.take_along_axis(S, top, 1)

    tr_refs, tr_scores = retrieve([x["prompt"] for x in train])
    he_refs, he_scores = retrieve([q["question"] for q in heldq])
    idx = {d["title"]: i for i, d in enumerate(ents_kb)}
    print(f"retrieval: train right@1 {np.mean([tr_refs[i, 0] == idx[x['title']] for i, x in enumerate(train)]):.3f} "
          f"@5 {np.mean([idx[x['title']] in tr_refs[i] for i, x in enumerate(train)]):.3f}; held-out "
          f"@1 {np.mean([he_refs[i, 0] == idx[q['title']] for i, q in enumerate(heldq)]):.3f} "
          f"@5 {np.mean([idx[q['title']] in he_refs[i] for i, q in enumerate(heldq)]):.3f}", flush=True)
    torch.save({"kv": KV, "pos": POS, "sink": sink, "train": train, "heldq": heldq, "titles": [d["title"] for d in ents_kb],
                "texts": [d["text"] for d in ents_kb],
                "tr_refs": torch.from_numpy(tr_refs), "tr_scores": torch.from_numpy(tr_scores),
                "he_refs": torch.from_numpy(he_refs), "he_scores": torch.from_numpy(he_scores),
                "selection": a.selection, "K": a.K, "layers": list(model.config.mem_layers)}, out / "prep.pt")


# --- adapters -------------------------------------------------------------------------------
class MemKV(nn.Module):
    """Per memory layer and KV head: memory keys (pre-RoPE) and values through (I + W)."""

    def __init__(self, n_layers, hkv, d):
        super().__init__()
        self.wk = nn.Parameter(torch.zeros(n_layers, hkv, d, d))
        self.wv = nn.Parameter(torch.zeros(n_layers, hkv, d, d))

    def forward(self, kv, pos, theta, p):
        # kv (B, S, L, 2, Hkv, k, D) post-RoPE; pos (B, S, L, Hkv, k)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        D = k.shape[-1]
        cos, sin = rope_cos_sin(pos.clamp_min(0).long(), D, theta, k.dtype)  # (..., k, D)
        k_pre = k * cos - torch.cat([-k[..., D // 2:], k[..., :D // 2]], -1) * sin  # inverse rotation
        k2 = k_pre + torch.einsum("lhij,bslhkj->bslhki", self.wk, k_pre)
        half = D // 2
        k2 = k2 * cos + torch.cat([-k2[..., half:], k2[..., :half]], -1) * sin
        v2 = v + torch.einsum("lhij,bslhkj->bslhki", self.wv, v)
        return torch.stack([k2, v2], 3)


class LoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale


class MemQ(nn.Module):
    """Reader-side, gated: a query delta that only memory keys see, and an output delta that only
    memory values feed (one SDPA call over [q | dq] . [k | k*is_memory]). Without memory the
    layer is exactly the base layer."""

    def __init__(self, attn, r, p):
        super().__init__()
        self.attn, self.p = attn, p
        H, D, hidden = attn.n_heads, attn.head_dim, attn.q_proj.in_features
        self.qa = nn.Parameter(torch.randn(r, hidden) / math.sqrt(hidden))
        self.qb = nn.Parameter(torch.zeros(H * D, r))
        self.oa = nn.Parameter(torch.randn(r, H * D) / math.sqrt(H * D))
        self.ob = nn.Parameter(torch.zeros(hidden, r))

    def forward(self, x, cos, sin, mask, attn_fn, extra_kv=None, cache=None, layer=0, **kw):
        a = self.attn
        if extra_kv is None or extra_kv.length <= self.p:
            return a(x, cos, sin, mask, attn_fn, extra_kv=extra_kv, cache=cache, layer=layer)
        B, T, _ = x.shape
        H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
        q = a.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = a.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        v = a.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        dq = F.linear(F.linear(x, self.qa), self.qb).view(B, T, H, D).transpose(1, 2)
        q, k, dq = apply_rope(q, cos, sin), apply_rope(k, cos, sin), apply_rope(dq, cos, sin)
        n_front = extra_kv.length
        if cache is not None:
            k, v = cache.update(layer, k, v, front=extra_kv)
        else:
            fk, fv = extra_kv.tensors()
            k = torch.cat([fk.to(k.dtype), k], 2)
            v = torch.cat([fv.to(v.dtype), v], 2)
        if kw.get("mem_bias") is not None:  # the retriever-score prior's bias, in the mask
            mask = with_key_bias(mask, kw["mem_bias"].to(q.dtype), self.p, k.shape[2])
        is_mem = torch.zeros(k.shape[2], 1, dtype=k.dtype)
        is_mem[self.p:n_front] = 1
        k2, v2, q2 = torch.cat([k, k * is_mem], -1), torch.cat([v, v * is_mem], -1), torch.cat([q, dq], -1)
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=m, scale=1 / math.sqrt(D), enable_gqa=True)
        base = out[..., :D].transpose(1, 2).reshape(B, T, H * D)
        memo = out[..., D:].transpose(1, 2).reshape(B, T, H * D)
        return a.o_proj(base) + F.linear(F.linear(memo, self.oa), self.ob)


def add_memq(model, r):
    params = []
    for i in model.config.mem_layers:
        mq = MemQ(model.layers[i].attn, r, model.config.prefix_length)
        model.layers[i].attn = mq
        params += [mq.qa, mq.qb, mq.oa, mq.ob]
    return params


def add_lora(model, r, targets, layers):
    params = []
    for i in layers:
        blk = model.layers[i]
        for mod_name, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            mod = getattr(blk, mod_name)
            for n in names:
                if n in targets:
                    lo = LoRA(getattr(mod, n), r, 2 * r)
                    setattr(mod, n, lo)
                    params += [lo.a, lo.b]
    return params


# --- training and evaluation ------------------------------------------------------------------
def sample_tokens(tok, prompt, answer):
    s = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    p = tok(s, add_special_tokens=False)["input_ids"]
    ans = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p, ans


def batch_of(tok, items):
    seqs = [sample_tokens(tok, pr, an) for pr, an in items]
    T = max(len(p) + len(a) for p, a in seqs)
    x = torch.full((len(seqs), T), tok.eos_token_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    keymask = torch.zeros(len(seqs), T, dtype=torch.bool)
    pos = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (p, a) in enumerate(seqs):
        s = p + a
        pad = T - len(s)  # left padding, as generation does
        x[b, pad:] = torch.tensor(s)
        y[b, pad + len(p) - 1:T - 1] = torch.tensor(a)
        keymask[b, pad:] = True
        pos[b, pad:] = torch.arange(len(s))
    return x, y, keymask, pos


def memory_for(P, refs, k, kvmap, model):
    kv = P["kv"][refs][..., :k, :].float()  # (B, S, L, 2, Hkv, k, D)
    pos = P["pos"][refs][..., :k]
    valid = pos >= 0
    if kvmap is not None:
        kv = kvmap(kv, pos, model.config.rope_theta, model.config.prefix_length)
    kv = kv * valid[:, :, :, None, :, :, None]
    return Memory(kv=kv, valid=valid, sink=P["sink"])


def forward_loss(model, x, y, keymask, pos, memory):
    cfg = model.config
    h = model(x, memory=memory, key_mask=keymask, position_ids=pos + cfg.context_offset, return_hidden=True)
    sel = y != -100
    logits = F.linear(h[sel], model.output_weight())
    return F.cross_entropy(logits.float(), y[sel]), logits.argmax(-1), y[sel], sel


def evaluate(model, tok, P, k, kvmap, use_memory=True, limit=None, bs=50, new_tokens=16, show=0):
    """Greedy answers (KV cache), right when the value is in the first sentence (m3 eval's rule)."""
    from m3cli.attention import KVCache
    from m3cli.evaluate import is_correct

    qs = P["heldq"][:limit]
    right, shown = 0, 0
    model.eval()
    cfg = model.config
    with torch.no_grad():
        for s in range(0, len(qs), bs):
            items = qs[s:s + bs]
            def user(j, q):
                if use_memory != "rag":
                    return q["question"]
                refs = P["he_refs"][s + j].tolist()
                return "\n\n".join(P["texts"][r] for r in refs) + "\n\n" + q["question"]
            prompts = [tok(tok.apply_chat_template([{"role": "user", "content": user(j, q)}], tokenize=False,
                                                   add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                       for j, q in enumerate(items)]
            T = max(len(p) for p in prompts)
            B = len(items)
            x = torch.full((B, T), tok.eos_token_id, dtype=torch.long)
            km = torch.zeros(B, T, dtype=torch.bool)
            for b, p in enumerate(prompts):
                x[b, T - len(p):] = torch.tensor(p)
                km[b, T - len(p):] = True
            pads = torch.tensor([T - len(p) for p in prompts])
            pos = (torch.arange(T)[None] - pads[:, None]).clamp_min(0) + cfg.context_offset
            mem = memory_for(P, P["he_refs"][s:s + B], k, kvmap, model) if use_memory is True else None
            cache = KVCache(cfg.n_layers)
            logits = model(x, memory=mem, cache=cache, position_ids=pos, key_mask=km, last_only=True)[:, -1]
            out = []
            lengths = torch.tensor([len(p) for p in prompts])
            for step in range(new_tokens):
                t = logits.argmax(-1)
                out.append(t)
                km = torch.cat([km, km.new_ones(B, 1)], 1)
                p2 = (lengths + step + cfg.context_offset)[:, None]
                logits = model(t[:, None], memory=mem, cache=cache, position_ids=p2, key_mask=km)[:, -1]
            out = torch.stack(out, 1)
            for b, q in enumerate(items):
                text = tok.decode(out[b].tolist(), skip_special_tokens=True)
                ok = is_correct(q["answer"], text)
                right += ok
                if shown < show:
                    print(f"  {q['question']} -> {text!r} ({q['answer']}, {'ok' if ok else 'wrong'})")
                    shown += 1
    model.train()
    return right / len(qs)


def train(a):
    torch.manual_seed(a.seed)
    P = torch.load(Path(a.prep) / "prep.pt", weights_only=False)
    model = load_model_dir(a.model, "cpu", torch.float32)
    if "layers" in P:
        model.config = model.config.replace(memory_layers=tuple(P["layers"]))
    tok = load_tokenizer(a.model)
    for p in model.parameters():
        p.requires_grad = False
    kvmap, params = None, []
    cfg = model.config
    if a.variant == "memkv":
        kvmap = MemKV(cfg.n_mem_layers, cfg.n_kv_heads, cfg.head_dim)
        params = list(kvmap.parameters())
    elif a.variant == "lora":
        params = add_lora(model, a.rank, set(a.targets.split(",")), range(cfg.n_layers))
    elif a.variant == "lora-mem":
        params = add_lora(model, a.rank, set(a.targets.split(",")), cfg.mem_layers)
    elif a.variant == "memq":
        params = add_memq(model, a.rank)
    elif a.variant == "memq+memkv":
        kvmap = MemKV(cfg.n_mem_layers, cfg.n_kv_heads, cfg.head_dim)
        params = add_memq(model, a.rank) + list(kvmap.parameters())
    elif a.variant == "memkv+lora":
        kvmap = MemKV(cfg.n_mem_layers, cfg.n_kv_heads, cfg.head_dim)
        params = list(kvmap.parameters()) + add_lora(model, a.rank, set(a.targets.split(",")), range(cfg.n_layers))
    n_params = sum(p.numel() for p in params)
    print(f"variant {a.variant}: {n_params:,} trainable parameters; k={a.k}", flush=True)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, betas=(0.9, 0.95))
    base = {"closed": evaluate(model, tok, P, a.k, None, use_memory=False, limit=a.eval_limit),
            "rag": evaluate(model, tok, P, a.k, None, use_memory="rag", limit=a.eval_limit, show=3)} if a.closed else {}
    base["memory@0"] = evaluate(model, tok, P, a.k, kvmap, limit=a.eval_limit, show=3)
    print(json.dumps(base), flush=True)
    rng = np.random.default_rng(a.seed)
    train_items = P["train"]
    t0 = time.time()
    log = []
    for step in range(a.steps):
        idx = rng.choice(len(train_items), a.batch, replace=False)
        items = [train_items[i] for i in idx]
        x, y, km, pos = batch_of(tok, [(it["prompt"], it["answer"]) for it in items])
        mem = memory_for(P, P["tr_refs"][idx], a.k, kvmap, model)
        lr = a.lr * min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, _, _, _ = forward_loss(model, x, y, km, pos, mem)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append(float(loss.detach()))
        if (step + 1) % 10 == 0:
            print(f"step {step + 1} loss {np.mean(log[-10:]):.3f} ({(time.time() - t0) / (step + 1):.2f} s/step)", flush=True)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            acc = evaluate(model, tok, P, a.k, kvmap, limit=a.eval_limit, show=3)
            print(json.dumps({"step": step + 1, "memory": acc, "loss": float(np.mean(log[-10:]))}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="out/smollm2")
    p.add_argument("--entities", type=int, default=2000)
    p.add_argument("--K", type=int, default=32)
    p.add_argument("--selection", default="attention_x_value_norm")
    p.add_argument("--layers", default="first-half")
    t = sub.add_parser("train")
    t.add_argument("--prep", required=True)
    t.add_argument("--model", default="out/smollm2")
    t.add_argument("--variant", default="memkv")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--k", type=int, default=16)
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--eval-limit", type=int, default=200)
    t.add_argument("--closed", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    prep(a) if a.cmd == "prep" else train(a)


if __name__ == "__main__":
    main()
