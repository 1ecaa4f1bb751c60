"""`m3 index` and `m3 search`: embeddings and a FAISS index inside the bank."""

import json
import shutil

import numpy as np
import pytest
import torch

from m3cli.bank import Bank
from m3cli.embed import minilm_dir

from cli_helpers import assert_user_error, encoded_bank, m3

DOCS = [
    {"id": "fr", "title": "France", "text": "the capital of france is paris ."},
    {"id": "it", "title": "Italy", "text": "the capital of italy is rome ."},
    {"id": "hw", "title": "Greeting", "text": "hello world , the memory model answers a question ."},
    {"id": "bo", "title": "Born", "text": "a city country born in rome was in italy ."},
]


@pytest.fixture
def bank(llama_dir, tmp_path):
    """A bank encoded by the tiny model and indexed (Flat, MiniLM) by `m3 encode` itself."""
    return encoded_bank(llama_dir[0], tmp_path, DOCS)


def top(path, query, *extra):
    result = m3("search", path, query, "--json", *extra)
    assert result.exit_code == 0, result.output
    return [h["ref"] for h in json.loads(result.stdout)["results"]]


def test_query_equal_to_a_reference_returns_it_first(bank):
    path, _ = bank
    for i, doc in enumerate(DOCS):
        assert top(path, doc["text"])[0] == i
    human = m3("search", path, "where is paris", "--memories", "2")
    assert human.exit_code == 0 and "France" in human.stdout.splitlines()[0]


def test_rebuild_keeps_ids_and_leaves_the_kv_payload_alone(bank):
    path, _ = bank
    with Bank(path) as b:
        kv_before, n_sections = b.sections["kv.data"], len(b.sections)
        emb_before = b.sections["emb.data"]
    before = [top(path, d["text"], "--memories", "4") for d in DOCS]
    result = m3("index", path, "--factory", "HNSW32", "-q")
    assert result.exit_code == 0 and "reused" in result.stdout, result.output
    with Bank(path) as b:
        # the same bytes (a small bank may be rewritten whole rather than grow: see update_bank)
        for name, before_section in (("kv.data", kv_before), ("emb.data", emb_before)):
            assert (b.sections[name].length, b.sections[name].sha256) == (before_section.length, before_section.sha256)
        assert len(b.sections) == n_sections and b.header["m3.index.factory"] == "HNSW32"
        assert b.verify() == []
    assert [top(path, d["text"], "--memories", "4") for d in DOCS] == before


def test_pca_hnsw_with_a_deeper_graph_keeps_ids_and_answers(bank):
    """The 1M-vector path (README, Retrieval): PCA to fewer dimensions, HNSW built with a larger
    efConstruction, candidates re-ranked with the exact vectors (k_factor kept in the index);
    the search depth stored in the bank is applied when it is read."""
    import faiss

    from m3cli.retrieval import hnsw_of, load_index, refine_of

    path, _ = bank
    result = m3(
        "index",
        path,
        "--factory",
        "PCA4,HNSW8,RFlat",
        "--ef-construction",
        "77",
        "--ef-search",
        "33",
        "--k-factor",
        "3",
        "-q",
    )
    assert result.exit_code == 0, result.output
    with Bank(path) as b:
        index = load_index(b)
        assert b.header["m3.index.factory"] == "PCA4,HNSW8,RFlat" and b.header["m3.index.ef_search"] == 33
    hnsw = hnsw_of(index)
    assert hnsw is not None and hnsw.hnsw.efConstruction == 77 and hnsw.hnsw.efSearch == 33
    refine = refine_of(index)
    assert refine.k_factor == 3 and isinstance(faiss.downcast_index(refine.base_index), faiss.IndexPreTransform)
    for i, doc in enumerate(DOCS):
        assert top(path, doc["text"])[0] == i


def test_max_overlap_drops_references_that_contain_the_query(bank):
    path, _ = bank
    assert top(path, DOCS[0]["text"], "--memories", "2")[0] == 0
    assert 0 not in top(path, DOCS[0]["text"], "--memories", "2", "--max-overlap", "0.67")


def test_max_score_gap_keeps_the_hits_near_the_best(bank):
    path, _ = bank
    result = m3("search", path, "the capital of italy", "--json", "--memories", "4")
    hits = json.loads(result.stdout)["results"]
    scores = [h["score"] for h in hits]
    assert len(hits) == 4 and scores == sorted(scores, reverse=True) and scores[0] - scores[-1] > 0.02
    gap = (scores[0] - scores[1]) / 2 if scores[0] > scores[1] else (scores[0] - scores[-1]) / 2
    kept = [h["ref"] for h in hits if h["score"] >= scores[0] - gap]
    assert 0 < len(kept) < 4
    assert top(path, "the capital of italy", "--memories", "4", "--max-score-gap", str(gap)) == kept
    assert top(path, "the capital of italy", "--memories", "4", "--max-score-gap", "0") == [
        h["ref"] for h in hits if h["score"] == scores[0]
    ]
    assert top(path, "the capital of italy", "--memories", "4", "--max-score-gap", "10") == [h["ref"] for h in hits]
    assert_user_error(m3("search", path, "paris", "--max-score-gap", "-0.1"), "--max-score-gap")
    assert_user_error(m3("search", path, "paris", "--max-score-gap", "nan"), "--max-score-gap")


def test_queries_from_stdin_give_json_lines(bank):
    path, _ = bank
    result = m3("search", path, "-", "--json", "--memories", "1", input="paris\nrome\n\nhello\n")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == ["paris", "rome", "hello"]
    assert all(len(line["results"]) == 1 and {"ref", "score", "text"} <= set(line["results"][0]) for line in lines)
    assert_user_error(m3("search", path, "-", input="\n"), "no query")


def test_self_embedder(bank):
    path, model = bank
    result = m3("index", path, "--embedder", "self", "-q")  # the model the bank names embeds
    assert result.exit_code == 0, result.output
    with Bank(path) as b:
        assert b.header["m3.embed.name"] == "self" and b.header["m3.embed.dim"] == 32
        assert b.header["m3.embed.hint"] == "self" and b.header["m3.model.hint"] == str(model.resolve())
    assert sorted(top(path, "paris", "--model", model)) == [0, 1, 2, 3]  # k=5 > 4 references: all of them
    assert top(path, DOCS[1]["text"], "--model", model)[0] == 1
    assert top(path, DOCS[1]["text"]) == top(path, DOCS[1]["text"], "--model", model)  # found from the bank
    moved = model.with_name("moved-model")
    model.rename(moved)  # the bank's model is gone: one line naming what to pass
    assert_user_error(m3("search", path, "paris"), "--model", "M3_MODEL")
    assert_user_error(m3("index", path, "--embedder", "self"), "--model", "M3_MODEL")
    assert top(path, DOCS[1]["text"], "--model", moved)[0] == 1


def test_errors_leave_the_bank_untouched(bank, tmp_path):
    path, model = bank
    original = path.read_bytes()
    assert_user_error(m3("index", path, "--factory", "Nonsense12"), "invalid FAISS index factory")
    assert_user_error(m3("index", path, "--factory", "IVF4096,PQ32"), "cannot train index")
    assert_user_error(m3("index", path, "--factory", "Flat", "--ef-construction", "80"), "applies to HNSW")
    assert_user_error(m3("index", path, "--factory", "HNSW32", "--ef-construction", "0"), "at least 1")
    assert_user_error(m3("index", path, "--factory", "HNSW32", "--k-factor", "8"), "RFlat")
    assert_user_error(m3("index", path, "--embedder", "/no/such/dir"), "unknown embedder")
    assert_user_error(m3("index", tmp_path / "missing.m3bank"), "does not exist")
    assert path.read_bytes() == original
    # a bank without an index
    corpus = tmp_path / "c2.jsonl"
    corpus.write_text(json.dumps(DOCS[0]) + "\n")
    bare = tmp_path / "bare.m3bank"
    assert m3("encode", corpus, "-o", bare, "-m", model, "-q", "--index", "none").exit_code == 0
    assert_user_error(m3("search", bare, "paris"), "no retrieval index")
    assert_user_error(
        m3("encode", corpus, "-o", tmp_path / "x.m3bank", "-m", model, "--index", "Bogus"),
        "invalid FAISS index factory",
    )


def test_embedder_mismatch_names_both(bank, tmp_path):
    path, _ = bank
    enc = tmp_path / "encoder"
    shutil.copytree(minilm_dir(), enc)
    assert m3("index", path, "--embedder", enc, "-q").exit_code == 0
    other = tmp_path / "other-encoder"
    shutil.copytree(minilm_dir(), other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "note": "changed"}))
    assert top(path, DOCS[0]["text"])[0] == 0  # the bank names the encoder dir it was indexed with
    assert top(path, DOCS[0]["text"], "--embedder", enc)[0] == 0
    shutil.move(enc, tmp_path / "moved-encoder")
    assert_user_error(m3("search", path, "paris"), "pass its directory with --embedder", str(enc.resolve()))
    assert top(path, DOCS[0]["text"], "--embedder", tmp_path / "moved-encoder")[0] == 0  # renamed: same files
    assert_user_error(m3("search", path, "paris", "--embedder", other), "query embedder")


def test_damaged_index_is_refused_before_faiss_reads_it(bank, tmp_path):
    path, _ = bank
    with Bank(path) as b:
        s = b.sections["index.faiss"]
    data = bytearray(path.read_bytes())
    data[s.offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_user_error(m3("search", path, "paris"), "index.faiss: SHA-256 mismatch")


def test_spec_lists_the_retrieval_keys(bank):
    from pathlib import Path

    path, _ = bank
    spec = (Path(__file__).parent.parent / "format_spec.md").read_text()
    with Bank(path) as b:
        keys = [k for k in b.header if k.startswith(("m3.embed.", "m3.index."))]
        assert len(keys) == 10
        assert all(f"`{k}`" in spec for k in keys)
        assert all(f"**`{name}`**" in spec for name in ("emb.data", "index.faiss"))


def test_interrupted_embedding_resumes(bank, monkeypatch):
    """`m3 index` killed while embedding continues from its checkpoint on the next run."""
    import m3cli.embed as embed_mod
    import m3cli.retrieval as retrieval

    path, _ = bank
    with Bank(path) as b:
        want = retrieval.embeddings_of(b)
    encoder = path.parent / "encoder"  # MiniLM's weights under other files: another embedder, embedded anew
    shutil.copytree(minilm_dir(), encoder)
    cfg = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**cfg, "note": "a copy"}))
    monkeypatch.setattr(retrieval, "CHECKPOINT_SECONDS", 0.0)
    real, seen = embed_mod.HFEncoder.embed, []

    def dying(self, texts):
        seen.append(len(texts))
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(embed_mod.HFEncoder, "embed", dying)
    result = m3("index", path, "--factory", "HNSW32", "--batch-size", "1", "--embedder", encoder, "-q")
    assert result.exit_code != 0
    spool = path.parent / f".{path.name}.emb.partial"
    assert json.loads((path.parent / (spool.name + ".json")).read_text())["done"] == 2
    monkeypatch.setattr(
        embed_mod.HFEncoder, "embed", lambda self, texts: (seen.append(len(texts)), real(self, texts))[1]
    )
    seen.clear()
    assert m3("index", path, "--batch-size", "1", "--embedder", encoder, "-q").exit_code == 0
    assert sum(seen) == len(DOCS) - 2  # only the missing references were embedded
    with Bank(path) as b:
        import numpy as np

        np.testing.assert_allclose(retrieval.embeddings_of(b), want, atol=1e-3)
    assert not spool.exists()


def test_minilm_in_bfloat16_embeds_as_in_float32():
    """On a CPU with native bfloat16 (`cpu_has_bf16`) the encoder's matrix products run in it:
    the embeddings agree with float32's to far below the float16 a bank stores them in, and rank
    the same texts first."""
    from m3cli.embed import HFEncoder, minilm_dir

    enc = HFEncoder(minilm_dir(), "mean", "minilm", torch.device("cpu"))
    texts = [d["text"] for d in DOCS] + ["which city is the capital of italy?", "a greeting to the world"]
    enc.bf16 = False
    exact = enc.embed(texts)
    enc.bf16 = True
    fast = enc.embed(texts)
    assert not np.array_equal(exact, fast)  # the bfloat16 path ran
    assert float((exact * fast).sum(1).min()) > 0.9999
    sims, fast_sims = exact @ exact.T - 2 * np.eye(len(texts)), fast @ fast.T - 2 * np.eye(len(texts))
    top2 = np.sort(sims, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # the nearest other text, where it is not a near-tie
    assert clear.any() and np.array_equal(sims.argmax(1)[clear], fast_sims.argmax(1)[clear])
