"""The model core: attention paths, cache, memory reading, the memory encoder, the block mask."""

import math

import pytest
import torch

from m3cli.attention import (
    KVCache,
    Memory,
    MemoryEncoding,
    attention_reference,
    attention_sdpa,
    chunk_visibility,
    expand_kv_heads,
    training_visibility,
)
from m3cli.config import preset
from m3cli.model import Memory3Model

PREFIX = (1, 2, 3)


def tiny(**changes):
    return preset("tiny").replace(reference_prefix_ids=PREFIX, **changes)


def make_model(attn_impl="sdpa", seed=0, **changes):
    torch.manual_seed(seed)
    return Memory3Model(tiny(**changes), attn_impl=attn_impl).eval()


def encode(model, n_refs=3, length=20, seed=1, top_k=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (n_refs, length), generator=g)
    lengths = torch.tensor([length - (i % 3) * (length // 4) for i in range(n_refs)])
    return model.encode_references(ids, lengths, top_k=top_k)


def memory_for(model, encs, visible=None):
    return Memory.from_encodings(encs, model.encode_prefix(), visible=visible)


@torch.no_grad()
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_matches_reference(heads, kv_heads):
    torch.manual_seed(0)
    B, T, S, D = 2, 5, 9, 8
    q = torch.randn(B, heads, T, D)
    k, v = torch.randn(B, kv_heads, S, D), torch.randn(B, kv_heads, S, D)
    mask = torch.rand(B, heads, T, S) > 0.4
    mask[..., 0] = True  # every row sees a key
    torch.testing.assert_close(attention_sdpa(q, k, v, mask), attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_sdpa(q, k, v, None), attention_reference(q, k, v, None), atol=1e-5, rtol=1e-5)
    # the form CUDA runs with a mask (no fused kernel takes a mask and grouped heads): heads expanded
    bias = torch.where(mask, torch.randn(B, heads, T, S), torch.tensor(float("-inf")))
    for m in (mask, bias):
        expanded = torch.nn.functional.scaled_dot_product_attention(
            q, expand_kv_heads(k, heads), expand_kv_heads(v, heads), attn_mask=m
        )
        torch.testing.assert_close(expanded, attention_reference(q, k, v, m), atol=1e-5, rtol=1e-5)


def test_reference_attention_fully_masked_row_is_zero():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 1, :] = False
    out = attention_reference(q, k, v, mask)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 4))
    assert not torch.isnan(out).any()


@torch.no_grad()
def test_model_sdpa_matches_reference_with_memory():
    a, b = make_model("reference"), make_model("sdpa")
    mem = memory_for(a, [encode(a)])
    ids = torch.randint(4, 512, (1, 30))
    torch.testing.assert_close(b(ids, memory=mem), a(ids, memory=mem), atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("with_memory", [False, True])
def test_cached_decoding_equals_full_forward(with_memory):
    model = make_model()
    ids = torch.randint(4, 512, (2, 23))
    mem = memory_for(model, [encode(model, 2), encode(model, 3, seed=5)]) if with_memory else None
    full = model(ids, memory=mem)
    cache = KVCache(model.config.n_layers)
    parts = [model(ids[:, :9], memory=mem, cache=cache)]
    for t in range(9, 23):  # then token by token
        parts.append(model(ids[:, t : t + 1], memory=mem, cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == 23


@torch.no_grad()
def test_cache_stays_valid_when_memories_change():
    """Prefill chunk 0 with memories A, decode chunk 1 with memories B = one full pass where
    chunk 0 reads A and chunk 1 reads B."""
    model = make_model()
    sink = model.encode_prefix()
    enc_a, enc_b = encode(model, 2, seed=1), encode(model, 2, seed=2)
    ids = torch.randint(4, 512, (1, 12))
    cache = KVCache(model.config.n_layers)
    first = model(ids[:, :7], memory=Memory.from_encodings([enc_a], sink), cache=cache)
    second = model(ids[:, 7:], memory=Memory.from_encodings([enc_b], sink), cache=cache)
    both = MemoryEncoding(
        torch.cat([enc_a.kv, enc_b.kv]),
        torch.cat([enc_a.valid, enc_b.valid]),
        torch.cat([enc_a.positions, enc_b.positions]),
    )
    token_chunk = (torch.arange(12) >= 7).long()
    visible = chunk_visibility(token_chunk, torch.tensor([[0, 0, 1, 1]]), window=0)
    full = model(ids, memory=Memory.from_encodings([both], sink, visible=visible))
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_no_memory_equals_empty_memory():
    model = make_model()
    ids = torch.randint(4, 512, (2, 17))
    none = model(ids)
    empty = Memory.from_encodings(
        [MemoryEncoding(*(t[:0] for t in (encode(model).kv, encode(model).valid, encode(model).positions)))] * 2,
        model.encode_prefix(),
    )
    assert empty.n_slots == 0
    assert torch.equal(model(ids, memory=empty), none)
    # memories that no token may see are no memory either
    mem = memory_for(model, [encode(model)] * 2, visible=torch.zeros(2, 17, 3, dtype=torch.bool))
    assert torch.equal(model(ids, memory=mem), none)
    # ...while visible memories do change the output
    assert not torch.allclose(model(ids, memory=memory_for(model, [encode(model)] * 2)), none)


@torch.no_grad()
def test_memory_slot_order_does_not_matter():
    # parallel positions: every memory sits at the positions it had while encoded, so the model
    # cannot tell its memories apart by their order (the retriever's rank is not an input)
    model = make_model(memory_layers=[0, 1, 2, 3])
    enc = encode(model, n_refs=5)
    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = MemoryEncoding(enc.kv[perm], enc.valid[perm], enc.positions[perm])
    ids = torch.randint(4, 512, (1, 30))
    a, b = model(ids, memory=memory_for(model, [enc])), model(ids, memory=memory_for(model, [shuffled]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # ...but which memories it reads does
    other = MemoryEncoding(enc.kv[:4], enc.valid[:4], enc.positions[:4])
    assert not torch.allclose(model(ids, memory=memory_for(model, [other])), a, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("attn_impl", ["reference", "sdpa"])
def test_memory_path_is_exact_without_sparsification(attn_impl):
    """Memory in all layers, k = all tokens: reading one memory == one causal pass over
    [prefix, reference, context] at positions [0..p-1, p..p+n-1, p+128..]."""
    model = make_model(attn_impl, memory_layers=tuple(range(4)), memory_top_k=128)
    cfg = model.config
    n, T, p = 17, 11, len(PREFIX)
    ref = torch.randint(4, 512, (1, n))
    ctx = torch.randint(4, 512, (1, T))
    enc = model.encode_references(ref, torch.tensor([n]))
    assert int(enc.valid.sum()) == cfg.n_mem_layers * cfg.n_kv_heads * n
    with_memory = model(ctx, memory=memory_for(model, [enc]))
    ids = torch.cat([torch.tensor([PREFIX]), ref, ctx], dim=1)
    positions = torch.cat([torch.arange(p + n), torch.arange(T) + p + cfg.reference_length])[None]
    one_pass = model(ids, position_ids=positions)[:, p + n :]
    torch.testing.assert_close(with_memory, one_pass, atol=1e-5, rtol=1e-4)


def naive_selection(model, ref_ids, length, layer_captures, k_top, value_norm=False):
    """Per reference, layer and KV head: loop over query heads and query tokens."""
    p = len(PREFIX)
    n_real = p + length
    out = {}
    for m, cap in enumerate(layer_captures):
        q, k = cap["q"][0], cap["k"][0]  # (H, L, D), (Hkv, L, D)
        H, Hkv, D = q.shape[0], k.shape[0], q.shape[-1]
        for h in range(Hkv):
            w = [0.0] * n_real
            for qh in range(h * (H // Hkv), (h + 1) * (H // Hkv)):
                for i in range(p, n_real):
                    logits = [float(q[qh, i] @ k[h, j]) / math.sqrt(D) for j in range(n_real)]
                    mx = max(logits)
                    exps = [math.exp(x - mx) for x in logits]
                    z = sum(exps)
                    for j in range(n_real):
                        w[j] += exps[j] / z
            if value_norm:  # memory_selection = "attention_x_value_norm"
                w = [w[j] * float(cap["v"][0, h, j].norm()) for j in range(n_real)]
            cands = sorted(range(p, n_real), key=lambda j: -w[j])[:k_top]
            out[(m, h)] = sorted(cands)
    return out


@torch.no_grad()
@pytest.mark.parametrize(
    "length,k_top,selection",
    [(9, 4, "attention"), (3, 4, "attention"), (6, 6, "attention"), (9, 4, "attention_x_value_norm")],
)
def test_sparsification_matches_naive_loop(length, k_top, selection):
    model = make_model("reference", memory_top_k=k_top, memory_selection=selection)
    cfg = model.config
    ref = torch.randint(4, 512, (1, length))
    enc = model.encode_references(ref, torch.tensor([length]))
    ids = torch.cat([torch.tensor([PREFIX]), ref], dim=1)
    L = ids.shape[1]
    captures = model._run_captured(ids, torch.arange(L), torch.ones(L, L, dtype=torch.bool).tril(), cfg.mem_layers)
    expected = naive_selection(model, ref, length, captures, k_top, value_norm=selection != "attention")
    p = len(PREFIX)
    for (m, h), positions in expected.items():
        got = enc.positions[0, m, h]
        assert got[enc.valid[0, m, h]].tolist() == positions
        assert all(pos >= p for pos in positions)  # prefix never selected
        k_rope = captures[m]["k_rope"][0, h]
        for slot, pos in enumerate(positions):
            torch.testing.assert_close(enc.kv[0, m, 0, h, slot], k_rope[pos])
    if k_top >= length:  # k >= length keeps every reference token
        assert int(enc.valid.sum()) == cfg.n_mem_layers * cfg.n_kv_heads * length


@torch.no_grad()
def test_padding_is_never_selected_and_batching_is_consistent():
    model = make_model(memory_top_k=8)
    refs = torch.randint(4, 512, (2, 12))
    lengths = torch.tensor([12, 5])
    batched = model.encode_references(refs, lengths)
    alone = model.encode_references(refs[1:, :5], lengths[1:])
    assert int(batched.positions[1].max()) < len(PREFIX) + 5
    assert torch.equal(batched.valid[1], alone.valid[0])
    assert torch.equal(batched.positions[1], alone.positions[0])
    torch.testing.assert_close(batched.kv[1], alone.kv[0], atol=1e-5, rtol=1e-4)


def test_training_block_mask_small_shapes():
    seq_len, chunk, window = 13, 3, 2
    vis = training_visibility(seq_len, 1, batch=2, chunk_length=chunk, window=window)
    n_chunks = 5
    assert vis.shape == (2, seq_len, n_chunks)
    for t in range(seq_len):
        for s in range(n_chunks):
            c = t // chunk
            assert bool(vis[0, t, s]) == (c - window <= s <= c), (t, s)
    # several slots per chunk, and empty slots
    vis2 = training_visibility(8, 2, batch=1, chunk_length=4, window=0)
    assert vis2[0].int().tolist() == [[1, 1, 0, 0]] * 4 + [[0, 0, 1, 1]] * 4
    slot_chunk = torch.tensor([[0, -1, 1]])
    assert chunk_visibility(torch.tensor([0, 1]), slot_chunk, window=4)[0].int().tolist() == [[1, 0, 0], [1, 0, 1]]


@torch.no_grad()
def test_training_forward_reads_exactly_chunks_c_minus_4_to_c():
    """Perturb the memory of one chunk: only tokens of chunks s..s+4 change. Memory sits in
    the last layer only, so a change cannot spread to later tokens through the context."""
    chunk, n_chunks = 4, 8
    model = make_model(chunk_length=chunk, memory_layers=(3,))
    T = chunk * n_chunks
    enc = encode(model, n_chunks, length=10)
    sink = model.encode_prefix()
    vis = training_visibility(T, 1, batch=1, chunk_length=chunk, window=model.config.train_prev_chunks)
    ids = torch.randint(4, 512, (1, T))
    base = model(ids, memory=Memory.from_encodings([enc], sink, visible=vis))
    s = 2
    kv = enc.kv.clone()
    kv[s] += torch.randn_like(kv[s])
    changed = model(
        ids, memory=Memory.from_encodings([MemoryEncoding(kv, enc.valid, enc.positions)], sink, visible=vis)
    )
    diff = (changed - base).abs().amax(-1)[0]  # (T,)
    chunk_changed = [bool(diff[c * chunk : (c + 1) * chunk].max() > 1e-6) for c in range(n_chunks)]
    assert chunk_changed == [s <= c <= s + 4 for c in range(n_chunks)]


def test_bf16_runs_through_the_same_code():
    model = make_model().to(torch.bfloat16)
    ids = torch.randint(4, 512, (1, 10))
    mem = memory_for(model, [encode(model)])
    out = model(ids, memory=mem)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prior", [False, True])
def test_cuda_bf16_matches_cpu_fp32(prior):
    cpu = make_model()
    scores = None
    if prior:  # the retriever-score prior's float mask, cast to bf16 for SDPA
        cpu.enable_score_prior()
        with torch.no_grad():
            cpu.memory_score_gain.fill_(0.02)
        scores = torch.tensor([[0.0, -0.01, -0.05], [-0.03, 0.0, -0.2]])
    ids = torch.randint(4, 512, (2, 40))
    mem = memory_for(cpu, [encode(cpu), encode(cpu, seed=3)])
    want = cpu(ids, memory=Memory(mem.kv, mem.valid, mem.sink, scores=scores))
    gpu = make_model().to("cuda", torch.bfloat16)
    if prior:
        gpu.enable_score_prior()
        gpu.load_state_dict(cpu.state_dict())
        assert not torch.allclose(want, cpu(ids, memory=mem), atol=1e-3)  # the bias matters here
    mem_gpu = Memory(mem.kv.cuda(), mem.valid.cuda(), mem.sink.cuda(), scores=None if scores is None else scores.cuda())
    got = gpu(ids.cuda(), memory=mem_gpu).float().cpu()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@torch.no_grad()
def test_value_norm_selection_changes_what_is_kept():
    ref = torch.randint(4, 512, (2, 30))
    lengths = torch.tensor([30, 30])
    a = make_model(memory_top_k=4).encode_references(ref, lengths)
    b = make_model(memory_top_k=4, memory_selection="attention_x_value_norm").encode_references(ref, lengths)
    assert not torch.equal(a.positions, b.positions)


# --- the retriever-score prior (M3Config.memory_score_prior; not in the paper) --------------------
def with_scores(mem, scores):
    return Memory(kv=mem.kv, valid=mem.valid, sink=mem.sink, visible=mem.visible, scores=scores)


@torch.no_grad()
@pytest.mark.parametrize("attn_impl", ["reference", "sdpa"])
def test_score_prior_at_zero_gain_is_the_paper_model(attn_impl):
    plain = make_model(attn_impl, memory_layers=[0, 1])
    prior = make_model(attn_impl, memory_layers=[0, 1])
    assert prior.enable_score_prior() and not prior.enable_score_prior()
    assert prior.memory_score_gain.shape == (2, prior.config.n_heads) and prior.config.memory_score_prior
    mem = memory_for(plain, [encode(plain, 4), encode(plain, 2, seed=3)])
    scored = with_scores(mem, torch.tensor([[0.0, -0.05, -0.1, -0.3], [0.0, -0.2, 0.0, 0.0]]))
    ids = torch.randint(4, 512, (2, 21))
    torch.testing.assert_close(prior(ids, memory=scored), plain(ids, memory=mem), atol=1e-5, rtol=1e-5)
    prior.memory_score_gain.fill_(3.0)  # a gain changes the reading only where scores differ
    torch.testing.assert_close(prior(ids, memory=mem), plain(ids, memory=mem), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        prior(ids, memory=with_scores(mem, torch.zeros(2, 4))), plain(ids, memory=mem), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(prior(ids, memory=scored), plain(ids, memory=mem), atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("attn_impl", ["reference", "sdpa"])
def test_score_prior_with_a_large_gain_reads_the_best_slot_alone(attn_impl):
    model = make_model(attn_impl, memory_layers=[0, 1, 2, 3])
    model.enable_score_prior()
    model.memory_score_gain.fill_(50.0)  # a gap of 0.1 -> a logit bias of -500
    enc = encode(model, n_refs=4)
    best = MemoryEncoding(enc.kv[2:3], enc.valid[2:3], enc.positions[2:3])
    ids = torch.randint(4, 512, (1, 30))
    scored = with_scores(memory_for(model, [enc]), torch.tensor([[-0.1, -0.2, 0.0, -0.15]]))
    torch.testing.assert_close(
        model(ids, memory=scored), model(ids, memory=memory_for(model, [best])), atol=1e-5, rtol=1e-5
    )
    # the attention probe (citations) sees the bias too
    probe = []
    model(ids, memory=scored, attention_probe=probe)
    share = torch.stack(probe).mean(0)[0, -1]  # (slots,): shares of all the token's attention
    assert share[2] > 0.01 and float(share[[0, 1, 3]].max()) < 1e-6


@torch.no_grad()
def test_score_prior_in_cached_decoding_and_block_masks():
    model = make_model(memory_layers=[0, 1])
    model.enable_score_prior()
    model.memory_score_gain.normal_(0, 2.0)
    ids = torch.randint(4, 512, (2, 23))
    mem = with_scores(
        memory_for(model, [encode(model, 3), encode(model, 3, seed=5)]),
        torch.tensor([[0.0, -0.02, -0.07], [-0.01, 0.0, -0.2]]),
    )
    full = model(ids, memory=mem)
    cache = KVCache(model.config.n_layers)
    parts = [model(ids[:, :9], memory=mem, cache=cache)]
    for t in range(9, 23):  # one token at a time: the mask-free fast path gets the bias too
        parts.append(model(ids[:, t : t + 1], memory=mem, cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
    # with a block mask (training) each token's slots keep their own bias
    visible = torch.ones(2, 23, 3, dtype=torch.bool)
    visible[:, :10, 2] = False
    masked = with_scores(memory_for(model, [encode(model, 3), encode(model, 3, seed=5)], visible), mem.scores)
    reference = make_model("reference", memory_layers=[0, 1])
    reference.enable_score_prior()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids, memory=masked), reference(ids, memory=masked), atol=1e-5, rtol=1e-4)


def test_score_prior_gain_gets_a_gradient():
    model = make_model(memory_layers=[0, 1])
    model.enable_score_prior()
    mem = with_scores(memory_for(model, [encode(model, 3)]), torch.tensor([[0.0, -0.05, -0.1]]))
    model(torch.randint(4, 512, (1, 12)), memory=mem).logsumexp(-1).sum().backward()
    assert model.memory_score_gain.grad is not None and model.memory_score_gain.grad.abs().sum() > 0


@torch.no_grad()
def test_replacing_the_config_re_derives_the_memory_layers():
    """`m3 pretrain --memory-layers all` on a first-half model: training must read the layers
    the saved config names (the model dir reloaded reads all of them too)."""
    half = make_model()  # tiny: memory in the first half
    full = make_model(memory_layers=[0, 1, 2, 3])
    full.load_state_dict(half.state_dict())
    half.config = half.config.replace(memory_layers=(0, 1, 2, 3))
    ids = torch.randint(4, 512, (1, 20))
    mem = memory_for(full, [encode(full)])
    torch.testing.assert_close(half(ids, memory=mem), full(ids, memory=mem), atol=1e-6, rtol=1e-6)
