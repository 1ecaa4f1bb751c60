"""`m3 generate` and `m3 score --bank`: the retrieval schedule, caching, batching, modes, errors."""

import json
from types import SimpleNamespace

import pytest
import torch

import m3cli.generate as generate_mod
import m3cli.model as model_mod
from m3cli.attention import Memory, chunk_visibility
from m3cli.bank import Bank
from m3cli.checkpoint import load_model_dir, load_tokenizer
from m3cli.generate import Generator, Options, decoded_chunk, prompt_chunks, retrieval_due
from m3cli.retrieval import Retriever, query_embedder

from cli_helpers import assert_user_error, encoded_bank, m3

DOCS = [
    {"id": "fr", "title": "France", "text": "the capital of france is paris . paris is a city ."},
    {"id": "it", "title": "Italy", "text": "the capital of italy is rome . rome is a city in italy ."},
    {"id": "hw", "title": "Greeting", "text": "hello world , the memory model answers a question ."},
    {"id": "bo", "title": "Born", "text": "a city country born in rome was in italy ."},
    {"id": "mo", "title": "Model", "text": "a model is a memory of the world and a reference ."},
    {"id": "qa", "title": "Question", "text": "the answer to the question is the capital ."},
]
PROMPT = "the capital of france is paris . the capital of italy is rome . hello world , the memory"


@pytest.fixture
def kb(llama_dir, tmp_path):
    return encoded_bank(llama_dir[0], tmp_path, DOCS)


@pytest.fixture
def gen(kb):
    path, model_dir = kb
    bank = Bank(path)
    model = load_model_dir(model_dir)
    tok = load_tokenizer(model_dir)
    g = Generator(model, tok, Retriever(bank, query_embedder(bank, model_dir=model_dir)))
    g.cfg = g.cfg.replace(chunk_length=4)  # several prompt chunks from a short prompt
    yield g
    bank.close()


def test_schedule():
    assert prompt_chunks(130, 64) == [(0, 64), (64, 128), (128, 130)]
    assert prompt_chunks(64, 64) == [(0, 64)]
    assert prompt_chunks(1, 64) == [(0, 1)]
    # generated token 0 starts the first decoded chunk, which inherits; 64, 128, … retrieve anew
    assert [g for g in range(200) if retrieval_due(g, 64)] == [64, 128, 192]
    assert [decoded_chunk(g, 64) for g in (0, 63, 64, 127, 128)] == [0, 0, 1, 1, 2]
    assert [g for g in range(10) if retrieval_due(g, 3)] == [3, 6, 9]


def _recorded_logits(monkeypatch):
    seen = []
    original = generate_mod._sample

    def recording(logits, opts, g):
        seen.append(logits.clone())
        return original(logits, opts, g)

    monkeypatch.setattr(generate_mod, "_sample", recording)
    return seen


@pytest.mark.parametrize(
    "prior,reader,chunked", [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
)
def test_cached_generation_equals_recomputation(gen, monkeypatch, prior, reader, chunked):
    """Every logit of a generation (prompt chunks, inherited chunk, chunks retrieved while decoding,
    cache front rewritten each time) equals one full forward with the same memories per token.
    With the retriever-score prior, each slot is biased by its hit's score minus the best of its
    chunk's hits, in every chunk. With a memory reader (decoding reads through `reader_attention`,
    the full forward through the doubled-head form); the prompt prefilled in one call (on a CPU
    chunk-aligned, `aligned_reader_attention`) or a chunk at a time."""
    gen.chunked_prefill_rows = 0 if chunked else 1 << 30
    if chunked:  # else the chunk-aligned one call is taken
        monkeypatch.setattr(model_mod.Memory3Model, "reads_aligned", lambda *a, **k: False)
    if reader:
        gen.model.enable_reader(4)
        gen.cfg = gen.model.config.replace(chunk_length=4)
        with torch.no_grad():
            for layer in gen.model.layers:
                if layer.attn.reader_rank:
                    layer.attn.mem_q_b.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
                    layer.attn.mem_o_b.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    if prior:
        gen.model.enable_score_prior()
        gen.cfg = gen.cfg.replace(memory_score_prior=True)
        with torch.no_grad():
            gen.model.memory_score_gain.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    seen = _recorded_logits(monkeypatch)
    opts = Options(mode="memory", max_new_tokens=11, retrieve_every=3, memories=2, stop_at_eos=False)
    c = gen.generate([PROMPT], opts)[0]
    assert len(c.token_ids) == 11 and len(seen) == 11
    sources = [r.source for r in c.chunks]
    n_prompt = sources.count("prompt")
    assert n_prompt == len(prompt_chunks(c.prompt_tokens, 4)) > 1
    assert sources[n_prompt:] == ["inherited", "generated", "generated", "generated"]
    assert [r.tokens for r in c.chunks[n_prompt:]] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert c.chunks[n_prompt].hits == c.chunks[n_prompt - 1].hits  # inheritance
    # the recomputation: one slot group per chunk record, each token reads its own chunk's group
    ids = gen.encode_prompt(PROMPT, opts) + c.token_ids[:-1]
    token_group = [i // 4 for i in range(c.prompt_tokens)] + [n_prompt + g // 3 for g in range(10)]
    slots, slot_group, gaps = [], [], []
    for grp, rec in enumerate(c.chunks):
        for h in rec.hits:
            slots.append(h.ref)
            slot_group.append(grp)
            gaps.append(h.score - max(x.score for x in rec.hits))
    assert not prior or min(gaps) < -1e-3  # some slot is biased
    enc = gen.retriever.bank.memories(slots)
    memory = Memory(
        kv=enc.kv[None],
        valid=enc.valid[None],
        sink=gen.sink(),
        visible=chunk_visibility(torch.tensor(token_group), torch.tensor([slot_group]), 0),
        scores=torch.tensor([gaps]) if prior else None,
    )
    monkeypatch.setattr(model_mod, "READER_ATTENTION", "doubled")  # the recomputation: the other form
    with torch.no_grad():
        full = gen.model(torch.tensor([ids]), memory=memory)[0]
    for i, logits in enumerate(seen):
        torch.testing.assert_close(logits[0], full[c.prompt_tokens - 1 + i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunked", [False, True])
def test_left_padded_batch_equals_one_by_one(gen, monkeypatch, chunked):
    """Also with the prompt prefilled a chunk's width at a time, where a block meets two chunks of
    a left-padded sequence, and each token's attention per memory (citations) is the same."""
    gen.chunked_prefill_rows = 0 if chunked else 1 << 30
    prompts = [PROMPT, "hello world", "the capital of italy is"]
    opts = Options(mode="memory", max_new_tokens=7, retrieve_every=3, memories=2, stop_at_eos=False, cite=True)
    seen = _recorded_logits(monkeypatch)
    batch = gen.generate(prompts, opts)
    batch_logits = torch.stack(seen)  # (steps, B, V)
    for b, p in enumerate(prompts):
        seen.clear()
        gen.chunked_prefill_rows = 1 << 30  # alone, in one call
        alone = gen.generate([p], opts)[0]
        assert alone.token_ids == batch[b].token_ids
        assert [(r.source, r.tokens, [h.ref for h in r.hits]) for r in alone.chunks] == [
            (r.source, r.tokens, [h.ref for h in r.hits]) for r in batch[b].chunks
        ]
        torch.testing.assert_close(torch.stack(seen)[:, 0], batch_logits[:, b], atol=1e-4, rtol=1e-4)
        for ra, rb in zip(alone.chunks, batch[b].chunks):
            if ra.source == "prompt":
                assert ra.attention is not None and rb.attention is not None
                torch.testing.assert_close(torch.tensor(ra.attention), torch.tensor(rb.attention), atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(
                    torch.tensor(ra.last_attention), torch.tensor(rb.last_attention), atol=1e-5, rtol=1e-4
                )


@pytest.mark.parametrize("reader", [False, True])
def test_citations_read_chunk_aligned_equal_the_masked_form(gen, monkeypatch, reader):
    """A prompt read chunk-aligned in one call (`aligned_reader_attention`) gives each prompt chunk
    the attention shares per memory that the masked form gives, with the retriever-score prior
    and, with a reader, its query delta; the logits are the same."""
    if reader:
        gen.model.enable_reader(4)
        with torch.no_grad():
            for layer in gen.model.layers:
                if layer.attn.reader_rank:
                    layer.attn.mem_q_b.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    gen.model.enable_score_prior()
    gen.cfg = gen.model.config.replace(chunk_length=4, memory_score_prior=True)
    with torch.no_grad():
        gen.model.memory_score_gain.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    gen.chunked_prefill_rows = 1 << 30
    opts = Options(mode="memory", max_new_tokens=2, memories=2, stop_at_eos=False, cite=True)
    taken = []
    aligned = model_mod.Memory3Model.reads_aligned
    monkeypatch.setattr(
        model_mod.Memory3Model, "reads_aligned", lambda *a, **k: taken.append(aligned(*a, **k)) or taken[-1]
    )
    seen = _recorded_logits(monkeypatch)
    fast = gen.generate([PROMPT], opts)[0]
    assert taken and taken[0] is True  # the prompt was read chunk-aligned
    monkeypatch.setattr(model_mod.Memory3Model, "reads_aligned", lambda *a, **k: False)
    fast_logits = seen[0].clone()
    seen.clear()
    masked = gen.generate([PROMPT], opts)[0]
    torch.testing.assert_close(fast_logits, seen[0], atol=1e-4, rtol=1e-4)
    prompt_chunks_seen = 0
    for ra, rb in zip(fast.chunks, masked.chunks):
        assert [h.ref for h in ra.hits] == [h.ref for h in rb.hits]
        if ra.source == "prompt":
            prompt_chunks_seen += 1
            assert sum(ra.attention) > 0
            torch.testing.assert_close(torch.tensor(ra.attention), torch.tensor(rb.attention), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                torch.tensor(ra.last_attention), torch.tensor(rb.last_attention), atol=1e-5, rtol=1e-4
            )
    assert prompt_chunks_seen > 1


def test_modes_differ_and_none_equals_the_plain_model(gen, monkeypatch):
    seen = _recorded_logits(monkeypatch)
    opts = Options(mode="none", max_new_tokens=3, stop_at_eos=False)
    gen.generate([PROMPT], opts)
    ids = torch.tensor([gen.encode_prompt(PROMPT, opts)])
    with torch.no_grad():
        plain = gen.model(ids)[0, -1]
    torch.testing.assert_close(seen[0][0], plain, atol=1e-5, rtol=1e-5)
    seen.clear()
    gen.generate([PROMPT], Options(mode="memory", max_new_tokens=1, memories=2))
    assert not torch.allclose(seen[0][0], plain, atol=1e-3)  # memory changes the prediction
    rag = gen.generate([PROMPT], Options(mode="rag", max_new_tokens=1, memories=2))[0]
    assert rag.prompt_tokens > ids.shape[1] and len(rag.chunks[0].hits) == 2


def test_lru_cache_serves_repeated_references(gen):
    opts = Options(mode="memory", max_new_tokens=4, memories=2)
    gen.generate([PROMPT], opts)
    misses = gen.memory_cache.misses
    gen.generate([PROMPT], opts)
    assert gen.memory_cache.misses == misses and gen.memory_cache.hits > 0


def test_sampling_is_seeded(kb):
    path, model = kb
    runs = [
        m3("generate", PROMPT, "-m", model, "-b", path, "-n", "8", "--temperature", t, "--seed", s, "--json")
        for t, s in (("0", "1"), ("0", "2"), ("1.5", "7"), ("1.5", "7"), ("1.5", "8"))
    ]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    texts = [json.loads(r.stdout)["new_tokens"] and json.loads(r.stdout)["text"] for r in runs]
    assert texts[0] == texts[1]  # greedy: the seed does not matter
    assert texts[2] == texts[3]  # same seed, same sample
    ids = [tuple(json.loads(r.stdout)["text"]) for r in runs[2:]]
    assert ids[0] != ids[2] or texts[2] != texts[0]


def test_three_prompts_on_stdin_give_three_json_lines(kb):
    path, model = kb
    stdin = "hello world\n\n" + json.dumps({"prompt": "the capital of france"}) + "\nthe capital of italy is\n"
    result = m3("generate", "-", "-m", model, "-b", path, "-n", "4", "--json", "--batch-size", "2", input=stdin)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["hello world", "the capital of france", "the capital of italy is"]
    for x in lines:
        assert x["mode"] == "memory" and x["new_tokens"] <= 4
        refs = x["chunks"][0]["references"]
        assert refs and all({"ref", "score", "attention", "title"} <= set(r) for r in refs)
        assert 0 < sum(r["attention"] for r in refs) <= 1


def test_mode_none_needs_no_bank_and_explain_lists_references(kb):
    path, model = kb
    result = m3("generate", "hello world", "-m", model, "--mode", "none", "-n", "3")
    assert result.exit_code == 0, result.output
    result = m3("generate", "hello world", "-m", model, "-b", path, "-n", "3", "--explain")
    assert result.exit_code == 0, result.output
    assert "--- references" in result.stdout and "chunk 0 (prompt tokens" in result.stdout


def test_score_modes_score_the_same_tokens(kb):
    path, model = kb
    out = {}
    for mode in ("none", "memory", "rag"):
        result = m3("score", PROMPT, "-m", model, "-b", path, "--mode", mode, "--json", "--memories", "2")
        assert result.exit_code == 0, result.output
        out[mode] = json.loads(result.stdout)
    n = len(out["none"]["logprobs"])
    assert all(len(v["logprobs"]) == n and v["mode"] == m for m, v in out.items())
    assert out["none"]["logprobs"] != out["memory"]["logprobs"] != out["rag"]["logprobs"]
    assert out["memory"]["chunks"] and out["rag"]["chunks"][0]["references"]


def test_generate_errors(kb, qwen_dir, tmp_path):
    path, model = kb
    too_long = " ".join(["the"] * 300)
    assert_user_error(m3("generate", too_long, "-m", model, "--mode", "none"), "prompt 1 has", "context")
    assert_user_error(m3("generate", "-", "-m", model, input=""), "no prompt on standard input")
    assert_user_error(m3("generate", "hi", "-m", model, "--mode", "memory"), "needs --bank")
    assert_user_error(m3("generate", "hi", "-m", model, "--mode", "bogus"), "unknown mode")
    assert_user_error(m3("generate", "hi", "-m", model, "--top-p", "0"), "--top-p")
    # a bank without an index
    corpus = tmp_path / "c2.jsonl"
    corpus.write_text(json.dumps(DOCS[0]) + "\n")
    bare = tmp_path / "bare.m3bank"
    assert m3("encode", corpus, "-o", bare, "-m", model, "-q", "--index", "none").exit_code == 0
    assert_user_error(m3("generate", "hi", "-m", model, "-b", bare), "no retrieval index", "m3 index")
    # a bank encoded by another model
    other = tmp_path / "other-model"
    assert m3("convert", qwen_dir[0], "-o", other).exit_code == 0
    assert_user_error(m3("generate", "hi", "-m", other, "-b", path), "was encoded by model", "re-encode")
    assert_user_error(m3("score", "hi there", "-m", other, "-b", path), "was encoded by model")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_matches_cpu(llama_dir, tmp_path):
    """Memory-mode generation on CUDA (fp32) gives the CPU's tokens and logits; bf16 runs."""
    path, model_dir = encoded_bank(llama_dir[0], tmp_path, DOCS, "--embedder", "self", "--device", "cpu")
    opts = Options(mode="memory", max_new_tokens=9, retrieve_every=3, memories=2, stop_at_eos=False)
    out = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
        with Bank(path) as bank:
            model = load_model_dir(model_dir, device, dtype)
            tok = load_tokenizer(model_dir)
            emb = query_embedder(bank, model_dir=model_dir, model=model, tokenizer=tok)
            g = Generator(model, tok, Retriever(bank, emb))
            g.cfg = g.cfg.replace(chunk_length=4)
            out[(device, dtype)] = g.generate([PROMPT, "hello world"], opts)
    cpu, gpu = out[("cpu", torch.float32)], out[("cuda", torch.float32)]
    assert [c.token_ids for c in cpu] == [c.token_ids for c in gpu]
    assert all(len(c.token_ids) == 9 for c in out[("cuda", torch.bfloat16)])


def test_each_sequence_of_a_batch_fills_its_own_context(gen):
    """A short prompt batched with one near the context limit still gets all its new tokens."""
    limit = gen.cfg.context_length
    long_prompt = " ".join(["the"] * (limit - 10))
    opts = Options(mode="none", max_new_tokens=20, stop_at_eos=False)
    long_c, short_c = gen.generate([long_prompt, "hello world"], opts)
    assert long_c.prompt_tokens + len(long_c.token_ids) == limit and long_c.finish_reason == "context"
    assert len(short_c.token_ids) == 20 and short_c.finish_reason == "length"
    assert short_c.token_ids == gen.generate(["hello world"], opts)[0].token_ids


def test_rag_score_without_any_reference_equals_closed_book(kb):
    path, model = kb
    out = {}
    for mode in ("none", "rag"):
        result = m3("score", PROMPT, "-m", model, "-b", path, "--mode", mode, "--max-overlap", "0", "--json")
        assert result.exit_code == 0, result.output
        out[mode] = json.loads(result.stdout)
    assert out["rag"]["chunks"][0]["references"] == []
    assert out["rag"]["logprobs"] == pytest.approx(out["none"]["logprobs"], abs=1e-5)


def test_chat_prompt_chunks_retrieve_with_the_user_text_only(gen):
    """With --chat, the template's own words (a system prompt, role names) stay out of memory
    mode's retrieval queries: a chunk of system prompt only reads no memories, and a last chunk
    of template only (the generation prompt) retrieves with the user's last words."""
    gen.tokenizer.chat_template = (
        "hello world model hello {% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} answer{% endif %}"
    )
    opts = Options(mode="memory", max_new_tokens=2, memories=2, chat=True)
    long, short = "the capital of italy is", "the capital of italy"
    assert gen.user_tokens(long, opts) == [False] * 4 + [True] * 5 + [False]
    assert gen.user_tokens("model", opts) == [False] * 4 + [True] + [False]  # not the template's own "model"
    assert gen.user_tokens(long, Options(mode="memory", chat=False)) is None
    # by default (chat=None) a tokenizer with a chat template gets it; one without, a plain prompt
    assert gen.user_tokens(long, Options(mode="memory")) == gen.user_tokens(long, opts)
    assert gen.encode_prompt(long, Options(mode="memory")) == gen.encode_prompt(long, opts)
    assert gen.encode_prompt(long, Options(mode="memory", chat=False)) != gen.encode_prompt(long, opts)
    completions = gen.generate([long, short], opts)  # different lengths: the short one is left-padded
    expected = {long: [(0, 4), (4, 8), (8, 10)], short: [(0, 4), (4, 8), (8, 9)]}
    queries = {
        long: [None, "the capital of italy", "is"],
        short: [None, "the capital of italy", "the capital of italy"],
    }
    for p, c in zip([long, short], completions):
        prompt_chunks_ = [r for r in c.chunks if r.source == "prompt"]
        assert [r.tokens for r in prompt_chunks_] == expected[p]
        assert [r.query for r in prompt_chunks_] == queries[p]
        assert prompt_chunks_[0].hits == [] and prompt_chunks_[1].hits and prompt_chunks_[2].hits
    # with --no-chat every chunk retrieves with all its text, as before
    (plain,) = gen.generate([long], Options(mode="memory", max_new_tokens=2, memories=2, chat=False))
    assert all(r.query and r.hits for r in plain.chunks if r.source == "prompt")
    gen.tokenizer.chat_template = None  # no template: the default is a plain prompt, --chat an error
    assert gen.user_tokens(long, Options(mode="memory")) is None
    assert gen.encode_prompt(long, Options(mode="memory")) == gen.encode_prompt(long, Options(chat=False))
    with pytest.raises(generate_mod.M3Error, match="no chat template"):
        gen.encode_prompt(long, opts)


def test_max_score_gap_keeps_each_chunks_near_best_references(gen):
    opts = Options(mode="memory", max_new_tokens=3, memories=3)
    (full,) = gen.generate([PROMPT], opts)
    (gapped,) = gen.generate([PROMPT], Options(mode="memory", max_new_tokens=3, memories=3, max_gap=0.0))
    for a, b in zip(full.chunks, gapped.chunks):
        assert [h.ref for h in b.hits] == [h.ref for h in a.hits if h.score >= a.hits[0].score]
    assert sum(len(c.hits) for c in gapped.chunks) < sum(len(c.hits) for c in full.chunks)
    with pytest.raises(generate_mod.M3Error, match="--max-score-gap"):
        Options(mode="memory", max_gap=-1.0).check()


def test_eval_and_score_pass_the_score_gap_and_check_it_first(monkeypatch, tmp_path):
    from m3cli import evaluate as ev

    seen = []

    class FakeGen:
        cfg = SimpleNamespace(context_length=64, memory_score_prior=True)

        def generate(self, prompts, opts):
            seen.append((opts.mode, opts.max_gap, opts.score_prior))
            return [generate_mod.Completion(p, "x", [], 0, "length") for p in prompts]

    out = ev.evaluate(FakeGen(), [{"question": "q", "answer": "a"}], ["memory", "rag"], max_gap=0.03)
    assert seen == [("memory", 0.03, True), ("rag", 0.03, True)] and out["memory"]["score_prior"] is True
    out = ev.evaluate(FakeGen(), [{"question": "q", "answer": "a"}], ["memory"], score_prior=False)
    assert seen[-1] == ("memory", None, False) and out["memory"]["score_prior"] is False
    missing = tmp_path / "no-model"
    for args in (["eval", "--model", missing, "--qa", tmp_path / "qa.jsonl"], ["score", "--model", missing, "text"]):
        assert_user_error(m3(*args, "--max-score-gap", "-1"), "--max-score-gap")


def test_keep_freed_memory_applies_once_and_leaves_a_users_allocator_settings_alone(monkeypatch):
    import os
    import platform
    import sys

    from m3cli import memory_cache

    monkeypatch.setattr(memory_cache, "_MALLOC_TUNED", False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user tuned glibc's allocator: not touched
    assert memory_cache.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")  # another allocator: not touched
    assert memory_cache.keep_freed_memory() is False
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("M3_KEEP_FREED_MEMORY", "0")  # asked not to
    assert memory_cache.keep_freed_memory() is False
    monkeypatch.delenv("M3_KEEP_FREED_MEMORY")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert memory_cache.keep_freed_memory() is True and memory_cache.keep_freed_memory() is True
