"""`m3 distill-embedder`: a static query embedder distilled from a sentence encoder, and its use
for indexing, search and generation."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from m3cli.bank import Bank
from m3cli.embed import STATIC_CONFIG, STATIC_VECTORS, StaticEmbedder, load_embedder, minilm_dir

from cli_helpers import assert_user_error, encoded_bank, m3
from test_retrieval import DOCS  # the same four tiny documents


@pytest.fixture
def teacher(tmp_path):
    """A tiny random BERT encoder with MiniLM's real WordPiece tokenizer (30,522 tokens), so
    distillation runs the whole vocabulary in a second."""
    from transformers import BertConfig, BertModel

    path = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(
        BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).eval().save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, path / name)
    return path


@pytest.fixture
def static_dir(teacher, tmp_path):
    out = tmp_path / "static"
    result = m3("distill-embedder", "-o", out, "--from", teacher, "--dims", "16", "-q")
    assert result.exit_code == 0, result.output
    assert "30522 token vectors of dim 16" in result.stdout
    return out


def test_a_text_embeds_as_the_normalised_mean_of_its_token_vectors(static_dir):
    emb = load_embedder(str(static_dir))
    assert isinstance(emb, StaticEmbedder)
    assert emb.spec.name == "static:static" and emb.spec.dim == 16 and emb.spec.fingerprint.startswith("sha256:")
    cfg = json.loads((static_dir / STATIC_CONFIG).read_text())
    assert cfg["format"] == "m3-static-embedder" and cfg["teacher"] == "hf:tiny-bert"
    text = "The capital of France is Paris."
    ids = emb.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) == 7  # lower-cased WordPiece, no [CLS]/[SEP]
    want = emb.vectors[ids].mean(0)
    got = emb.embed([text, "", text.upper()])
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
    assert not got[1].any()  # no tokens: the zero vector, not NaN
    np.testing.assert_allclose(got[2], got[0], atol=1e-6)  # the teacher's normaliser (uncased) applies
    # the Zipf/SIF weights shrink frequent (low-rank) tokens relative to rare ones
    norms = np.linalg.norm(emb.vectors, axis=1)
    assert norms[2000:3000].mean() < norms[20000:21000].mean()


def test_index_search_and_generate_with_a_static_embedder(static_dir, llama_dir, tmp_path):
    path, model = encoded_bank(llama_dir[0], tmp_path, DOCS)
    result = m3("index", path, "--embedder", static_dir, "-q")
    assert result.exit_code == 0, result.output
    with Bank(path) as b:
        assert b.header["m3.embed.name"] == "static:static" and b.header["m3.embed.dim"] == 16
        assert b.header["m3.embed.hint"] == str(Path(static_dir).resolve())
    result = m3("search", path, DOCS[0]["text"], "--json", "--memories", "1")  # the bank names its embedder dir
    assert result.exit_code == 0 and json.loads(result.stdout)["results"][0]["ref"] == 0, result.output
    for i, doc in enumerate(DOCS):  # a reference's own text finds it first, with cosine 1
        result = m3("search", path, doc["text"], "--embedder", static_dir, "--json", "--memories", "1")
        assert result.exit_code == 0, result.output
        hit = json.loads(result.stdout)["results"][0]
        assert hit["ref"] == i and hit["score"] == pytest.approx(1.0, abs=1e-3)
    result = m3(
        "generate", "--model", model, "--bank", path, "--embedder", static_dir, "-n", "3", "--json", DOCS[1]["text"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["chunks"][0]["references"][0]["ref"] == 1


def test_idf_weights_from_a_corpus(teacher, tmp_path):
    corpus = tmp_path / "kb.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    out = tmp_path / "kb-static"
    result = m3("distill-embedder", "-o", out, "--from", teacher, "--dims", "32", "--idf-corpus", corpus, "-q")
    assert result.exit_code == 0, result.output
    assert "IDF weights from 4 documents" in result.stdout
    emb = load_embedder(str(out))
    assert emb.config["weights"] == "idf" and emb.config["idf_documents"] == 4
    ids = {w: emb.tokenizer.token_to_id(w) for w in ("the", "capital", "paris", "zebra")}
    # with dims = the teacher's width PCA only rotates, so a token's norm is its weight times a
    # norm that does not depend on the corpus: compare against the SIF-weighted distillation
    plain = tmp_path / "plain"
    assert m3("distill-embedder", "-o", plain, "--from", teacher, "--dims", "32", "-q").exit_code == 0
    ref = load_embedder(str(plain))
    inv_rank = 1.0 / np.arange(2, len(ref.vectors) + 2)
    sif = 1e-4 / (1e-4 + inv_rank / inv_rank.sum())

    def norm(e, w, scale=1.0):
        return float(np.linalg.norm(e.vectors[ids[w]]) / scale)

    for word, df in (("the", 3), ("capital", 2), ("paris", 1)):
        unweighted = norm(ref, word, sif[ids[word]])
        assert norm(emb, word) == pytest.approx(np.log(5 / (df + 1)) * unweighted, rel=1e-3)
    assert norm(emb, "zebra") == 0  # in no document: weight 0
    assert not emb.embed(["zebra"]).any()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(
        m3("distill-embedder", "-o", tmp_path / "x", "--from", teacher, "--dims", "16", "--idf-corpus", empty),
        "no documents",
    )
    assert_user_error(
        m3(
            "distill-embedder",
            "-o",
            tmp_path / "x",
            "--from",
            teacher,
            "--dims",
            "16",
            "--idf-corpus",
            tmp_path / "missing.jsonl",
        ),
        "does not exist",
    )
    assert not (tmp_path / "x").exists()


def test_changed_vectors_change_the_fingerprint(static_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(static_dir, other)
    v = load_file(str(other / STATIC_VECTORS))["vectors"]
    save_file({"vectors": v * 2}, str(other / STATIC_VECTORS))
    assert load_embedder(str(other)).spec.fingerprint != load_embedder(str(static_dir)).spec.fingerprint


def test_errors(teacher, static_dir, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(m3("distill-embedder", "-o", tmp_path / "x", "--from", teacher, "--dims", "33"), "--dims must be")
    assert_user_error(
        m3("distill-embedder", "-o", tmp_path / "x", "--from", teacher, "--dims", "16", "--sif", "0"), "--sif"
    )
    assert_user_error(m3("distill-embedder", "-o", tmp_path / "x", "--from", "self"), "teacher must be")
    assert_user_error(m3("distill-embedder", "-o", tmp_path / "x", "--from", static_dir), "teacher must be")
    assert_user_error(m3("distill-embedder", "-o", tmp_path / "x", "--from", tmp_path / "nope"), "unknown embedder")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
    assert_user_error(m3("distill-embedder", "-o", static_dir, "--from", teacher), "already exists")
    assert_user_error(m3("distill-embedder", "-o", teacher, "--from", teacher, "--force"), "not a static embedder dir")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(DOCS[0]) + "\n")
    assert_user_error(
        m3("distill-embedder", "-o", tmp_path / "x", "--from", teacher, "--dims", "16", "--idf-corpus", one),
        "every weight would be 0",
    )
    assert not (tmp_path / "x").exists()
    assert_user_error(m3("distill-embedder", "-o", static_dir, "--from", teacher, "--dims", "40", "--force"), "--dims")


def test_a_damaged_directory_is_refused_with_one_line(static_dir, llama_dir, tmp_path):
    from safetensors.numpy import save_file

    from m3cli.errors import M3Error

    path, _ = encoded_bank(llama_dir[0], tmp_path, DOCS)
    assert m3("index", path, "--embedder", static_dir, "-q").exit_code == 0
    bad = tmp_path / "bad"
    shutil.copytree(static_dir, bad)
    save_file({"vectors": np.zeros((5, 16), dtype=np.float32)}, str(bad / STATIC_VECTORS))
    assert_user_error(m3("search", path, "paris", "--embedder", bad), "vocabulary size 30522")
    with pytest.raises(M3Error, match="vocabulary size 30522"):
        StaticEmbedder(bad)
    (bad / STATIC_VECTORS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_user_error(m3("search", path, "paris", "--embedder", bad), "cannot load the static embedder")
    (bad / STATIC_CONFIG).write_text("{}")
    with pytest.raises(M3Error, match="does not describe"):
        StaticEmbedder(bad)


def test_token_ids_beyond_the_vocabulary_size_and_typed_special_tokens(tmp_path):
    """A vocabulary with a gap: ids reach past the token count, and the table must cover them;
    special tokens typed in a text do not count; a text of unknown tokens retrieves nothing."""
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from m3cli.errors import M3Error

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1, "b": 5}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("[SEP]", special=True)])  # id 3, the next free count
    assert tok.encode("a b [SEP]").ids == [0, 5, 3] and tok.get_vocab_size() == 4
    d = tmp_path / "gap"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / STATIC_CONFIG).write_text(json.dumps({"format": "m3-static-embedder", "dim": 2}))
    save_file({"vectors": np.ones((4, 2), dtype=np.float32)}, str(d / STATIC_VECTORS))
    with pytest.raises(M3Error, match="vocabulary size 6"):  # 4 rows would let id 5 index past the table
        StaticEmbedder(d)
    vectors = np.zeros((6, 2), dtype=np.float32)
    vectors[0], vectors[5], vectors[3] = (1, 0), (0, 1), (5, 5)
    save_file({"vectors": vectors}, str(d / STATIC_VECTORS))
    emb = StaticEmbedder(d)
    got = emb.embed(["a b", "a b [SEP]", "[UNK]", "[SEP]"])
    np.testing.assert_allclose(got[0], [2**-0.5, 2**-0.5], rtol=1e-6)
    np.testing.assert_allclose(got[1], got[0])  # [SEP] left out
    assert not got[2].any() and not got[3].any()


def test_a_query_without_known_tokens_retrieves_nothing(teacher, llama_dir, tmp_path):
    corpus = tmp_path / "kb.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    out = tmp_path / "kb-static"
    assert (
        m3("distill-embedder", "-o", out, "--from", teacher, "--dims", "16", "--idf-corpus", corpus, "-q").exit_code
        == 0
    )
    path, _ = encoded_bank(llama_dir[0], tmp_path, DOCS)
    assert m3("index", path, "--embedder", out, "-q").exit_code == 0
    result = m3("search", path, "zebra giraffe", "--embedder", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"] == []  # tokens no reference has: weight 0, no hits
    result = m3("search", path, "zebra capital of italy", "--embedder", out, "--json", "--memories", "1")
    assert json.loads(result.stdout)["results"][0]["ref"] == 1


def test_bench_accepts_a_static_embedder_for_a_synthetic_bank(static_dir, tmp_path):
    result = m3(
        "bench",
        "--model",
        "tiny",
        "--synthetic-refs",
        "40",
        "--embedder",
        static_dir,
        "--batch-size",
        "1",
        "--prompt-len",
        "16",
        "--max-new-tokens",
        "4",
        "--memories",
        "2",
        "--repeats",
        "1",
        "--json",
        "--workdir",
        tmp_path / "w",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert {r["mode"] for r in rows} == {"none", "memory", "rag"}
    assert all(r["retrieval_s"] > 0 for r in rows if r["mode"] != "none")
