"""`m3 encode` and `m3 inspect BANK`: corpora in, a bank that holds what the model computed."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from m3cli.bank import Bank
from m3cli.checkpoint import load_model_dir, load_tokenizer, model_fingerprint
from m3cli.corpus import split_references
from cli_helpers import assert_user_error, m3


DOCS = [
    {"id": "fr", "title": "France", "text": "the capital of france is paris . paris is a city in france ."},
    {"id": "it", "title": "Italy", "source": "atlas", "text": "the capital of italy is rome . rome was a city ."},
    {"id": "hw", "text": "hello world . " * 30},  # longer than one reference of the tiny config
]


@pytest.fixture
def model_dir(llama_dir, tmp_path):
    """The tiny converted Llama, with a short reference length so that documents split."""
    src, _ = llama_dir
    out = tmp_path / "m3-model"
    assert m3("convert", src, "-o", out).exit_code == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["reference_length"] = 16
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_encode_jsonl_stores_what_the_model_computes(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    bank_path = tmp_path / "kb.m3bank"
    result = m3("encode", "--index", "none", corpus, "-o", bank_path, "--model", model_dir, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    model, tok = load_model_dir(model_dir), load_tokenizer(model_dir)
    with Bank(bank_path) as bank:
        assert bank.header["m3.model.fingerprint"] == model_fingerprint(model_dir)
        assert bank.n_docs == 3
        refs = [(d, r) for d in DOCS for r in split_references(d["text"], tok, 16)]
        assert bank.n_refs == len(refs) > 3
        assert max(len(ids) for _, (_, ids) in refs) <= 16
        for i, (doc, (text, ids)) in enumerate(refs):
            ref = bank.reference(i)
            assert ref.text == text and ref.token_count == len(ids)
            assert bank.document(ref.doc_index).id == doc["id"]
            with torch.no_grad():
                want = model.encode_references(torch.tensor([ids]), torch.tensor([len(ids)]))
            got = bank.memories([i])
            assert torch.equal(got.positions, want.positions)
            torch.testing.assert_close(got.kv, want.kv.to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
        assert bank.document(1).source == "atlas" and bank.document(0).title == "France"
    info = json.loads(m3("inspect", bank_path, "--json").stdout)
    assert info["references"] == len(refs) and info["codec"] == "bf16"
    assert info["bytes_per_reference"] == info["bytes_per_reference_bf16"]
    assert {s["name"] for s in info["sections"]} >= {"kv.data", "refs.text"}
    ok = m3("inspect", bank_path, "--verify")
    assert ok.exit_code == 0 and ok.stdout.startswith("ok:")


def test_encode_is_deterministic_and_formats_agree(model_dir, tmp_path):
    jsonl = write_jsonl(tmp_path / "c.jsonl", DOCS)
    parquet = tmp_path / "c.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"id": d["id"], "title": d.get("title"), "source": d.get("source"), "text": d["text"]} for d in DOCS]
        ),
        parquet,
    )
    a, b, c = tmp_path / "a.m3bank", tmp_path / "b.m3bank", tmp_path / "c.m3bank"
    assert m3("encode", "--index", "none", jsonl, "-o", a, "-m", model_dir, "-q").exit_code == 0
    assert m3("encode", "--index", "none", parquet, "-o", b, "-m", model_dir, "-q").exit_code == 0
    assert m3("encode", "--index", "none", "-", "-o", c, "-m", model_dir, "-q", input=jsonl.read_text()).exit_code == 0
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()


def test_int8_codec_is_smaller_and_close(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    a, b = tmp_path / "bf16.m3bank", tmp_path / "int8.m3bank"
    assert m3("encode", "--index", "none", corpus, "-o", a, "-m", model_dir, "-q").exit_code == 0
    assert m3("encode", "--index", "none", corpus, "-o", b, "-m", model_dir, "-q", "--codec", "int8").exit_code == 0
    with Bank(a) as x, Bank(b) as y:
        assert y.record_bytes < x.record_bytes
        ka, kb = x.memories(range(x.n_refs)).kv, y.memories(range(y.n_refs)).kv
        assert (ka - kb).abs().max() <= 0.02 * ka.abs().max()


def test_inspect_ref_shows_kept_tokens(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:1])
    bank_path = tmp_path / "kb.m3bank"
    assert m3("encode", "--index", "none", corpus, "-o", bank_path, "-m", model_dir, "-q").exit_code == 0
    detail = json.loads(m3("inspect", bank_path, "--ref", "0", "--model", model_dir, "--json").stdout)
    assert detail["document"]["id"] == "fr" and detail["text"].startswith("the capital")
    words = set(detail["text"].split())
    for layer in detail["kept"]:
        for head in layer["heads"]:
            assert len(head["tokens"]) == min(8, detail["token_count"])
            assert set(head["tokens"]) <= words
    human = m3("inspect", bank_path, "--ref", "0")
    assert human.exit_code == 0 and "layer" in human.stdout
    assert_user_error(m3("inspect", bank_path, "--ref", "99"), "out of range")


def test_inspect_escapes_control_characters(model_dir, tmp_path):
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"id": "x\x1b[31m", "title": "t\x07", "text": "hello \x1b]0;pwned\x07 world ."}]
    )
    bank_path = tmp_path / "kb.m3bank"
    assert m3("encode", "--index", "none", corpus, "-o", bank_path, "-m", model_dir, "-q").exit_code == 0
    out = m3("inspect", bank_path, "--ref", "0").stdout
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out


def test_encode_errors_leave_nothing(model_dir, tmp_path):
    out = tmp_path / "out" / "kb.m3bank"

    def check(result, fragment):
        assert_user_error(result, fragment)
        assert not out.parent.exists() or list(out.parent.iterdir()) == []

    check(m3("encode", "--index", "none", tmp_path / "missing.jsonl", "-o", out, "-m", model_dir), "does not exist")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet")
    check(m3("encode", "--index", "none", bad_parquet, "-o", out, "-m", model_dir), "not a readable Parquet file")
    no_text = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["x"]}), no_text)
    check(m3("encode", "--index", "none", no_text, "-o", out, "-m", model_dir), "no 'text' column")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    check(m3("encode", "--index", "none", empty, "-o", out, "-m", model_dir), "no text to encode")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "   "}])
    check(m3("encode", "--index", "none", blank, "-o", out, "-m", model_dir), "no text to encode")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        write_jsonl(tmp_path / "ok.jsonl", DOCS).read_bytes() + '{"text": "caf\xe9"}\n'.encode("latin-1")
    )
    check(m3("encode", "--index", "none", latin1, "-o", out, "-m", model_dir), "line 4 is not valid UTF-8")
    not_json = tmp_path / "bad.jsonl"
    not_json.write_text('{"text": "fine"}\n{oops\n')
    check(m3("encode", "--index", "none", not_json, "-o", out, "-m", model_dir), "line 2 is not valid JSON")
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"body": "x"}])
    check(m3("encode", "--index", "none", no_field, "-o", out, "-m", model_dir), "no string field 'text'")
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((model_dir / name).read_bytes())
    check(
        m3("encode", "--index", "none", write_jsonl(tmp_path / "c.jsonl", DOCS), "-o", out, "-m", no_tok),
        "no tokenizer",
    )
    check(
        m3("encode", "--index", "none", tmp_path / "c.jsonl", "-o", out, "-m", model_dir, "--codec", "zip"),
        "unknown codec",
    )
    check(m3("encode", "--index", "none", "-", "-o", out, "-m", model_dir, input=""), "no text to encode")


def test_encode_refuses_to_overwrite_without_force(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    bank_path = tmp_path / "kb.m3bank"
    bank_path.write_bytes(b"precious")
    assert_user_error(m3("encode", "--index", "none", corpus, "-o", bank_path, "-m", model_dir), "already exists")
    assert bank_path.read_bytes() == b"precious"
    assert m3("encode", "--index", "none", corpus, "-o", bank_path, "-m", model_dir, "-q", "--force").exit_code == 0
    with Bank(bank_path) as bank:
        assert bank.n_docs == 3


def test_split_references_respects_sentences_and_limits(model_dir):
    tok = load_tokenizer(model_dir)
    text = "the capital of france is paris . rome is a city . " + "hello world " * 20 + "."
    refs = split_references(text, tok, 8)
    assert refs[0][0] == "the capital of france is paris ."  # a whole sentence
    assert all(0 < len(ids) <= 8 for _, ids in refs)
    assert " ".join(t for t, _ in refs).split() == text.split()  # nothing lost


def test_vq_codec_trains_on_the_bank_and_round_trips(model_dir, tmp_path):
    words = "the a of to and in is was capital city country born reference paris france rome italy".split()
    docs = [
        {"id": f"d{i}", "text": " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 9)) + " ."}
        for i in range(120)
    ]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    a, b = tmp_path / "bf16.m3bank", tmp_path / "vq.m3bank"
    assert m3("encode", "--index", "none", corpus, "-o", a, "-m", model_dir, "-q").exit_code == 0
    result = m3(
        "encode", "--index", "none", corpus, "-o", b, "-m", model_dir, "-q", "--codec", "vq", "--vq-subquantizers", "4"
    )
    assert result.exit_code == 0, result.output
    with Bank(a) as x, Bank(b) as y:
        assert y.codec == "vq" and y.record_bytes == x.record_bytes // 4  # 4 bytes per 8-dim vector vs 16
        assert y.verify() == []
        mx, my = x.memories(range(x.n_refs)), y.memories(range(y.n_refs))
        assert torch.equal(mx.positions, my.positions)
        rel = float((mx.kv - my.kv).norm() / mx.kv.norm())
        assert 0 < rel < 0.35, rel  # lossy, but close
        assert torch.equal(
            my.kv[~my.valid[:, :, None].expand_as(my.kv[..., 0]).unsqueeze(-1).expand_as(my.kv)],
            torch.zeros(int((~my.valid).sum()) * 2 * my.kv.shape[-1]),
        )
    info = json.loads(m3("inspect", b, "--json").stdout)
    assert info["compression_vs_bf16"] == 4.0 and "codec.vq" in {s["name"] for s in info["sections"]}
    assert_user_error(
        m3(
            "encode",
            "--index",
            "none",
            corpus,
            "-o",
            tmp_path / "c.m3bank",
            "-m",
            model_dir,
            "--codec",
            "vq",
            "--vq-subquantizers",
            "3",
        ),
        "divides the head dim",
    )


def test_hostile_corpus_records_are_user_errors(model_dir, tmp_path):
    out = tmp_path / "kb.m3bank"
    cases = [
        ('{"text": "bad \\ud800 surrogate"}\n', "invalid Unicode in field 'text'"),
        ('{"id": "a\\udc00", "text": "fine"}\n', "invalid Unicode in field 'id'"),
        ('{"id": ' + "9" * 5000 + ', "text": "x"}\n', "cannot be read"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "cannot be read"),
    ]
    for body, fragment in cases:
        corpus = tmp_path / "c.jsonl"
        corpus.write_text(body)
        assert_user_error(m3("encode", "--index", "none", corpus, "-o", out, "-m", model_dir), fragment)
        assert not out.exists()
    # a Parquet file with a damaged data page
    parquet = tmp_path / "c.parquet"
    rng = __import__("random").Random(0)
    texts = [" ".join(f"w{rng.randrange(1000)}" for _ in range(100)) for _ in range(50)]  # incompressible-ish
    pq.write_table(pa.table({"text": texts}), parquet, compression="snappy")
    data = bytearray(parquet.read_bytes())
    for i in range(200, 600):
        data[i] ^= 0x5A
    parquet.write_bytes(bytes(data))
    assert_user_error(m3("encode", "--index", "none", parquet, "-o", out, "-m", model_dir), "c.parquet")
    assert not out.exists()


def test_resume_refuses_stdin(model_dir, tmp_path):
    assert_user_error(
        m3(
            "encode",
            "--index",
            "none",
            "-",
            "-o",
            tmp_path / "kb.m3bank",
            "-m",
            model_dir,
            "--resume",
            input=json.dumps(DOCS[0]) + "\n",
        ),
        "--resume needs a corpus file",
    )


def test_reference_ids_tokenize_the_text_as_it_reads_after_the_prefix():
    """A reference's first word is tokenized as mid-sentence, like the same word in a prompt;
    a whitespace-only first token (SentencePiece's reading of the space) is dropped."""
    from m3cli.checkpoint import load_tokenizer
    from m3cli.corpus import reference_ids

    tok = load_tokenizer(Path(__file__).resolve().parent.parent / "samples" / "model")
    prompt = tok("Where was Kaeth Brainor born?", add_special_tokens=False)["input_ids"]
    ref = reference_ids(tok, "Kaeth Brainor: birthplace Kessel")
    assert any(prompt[i : i + 3] == ref[:3] for i in range(len(prompt)))  # ' K', 'aeth', ' Brain'
    assert ref != tok("Kaeth Brainor: birthplace Kessel", add_special_tokens=False)["input_ids"]

    class SentencePieceLike:  # "▁" alone for the space, then "▁word" pieces
        def __call__(self, text, add_special_tokens=False):
            words = text.split(" ")
            ids = ([0] if text.startswith(" ") else []) + [len(w) + 1 for w in words if w]
            return {"input_ids": ids}

        def decode(self, ids):
            return "".join(" " if i == 0 else "x" * (i - 1) for i in ids)

    assert reference_ids(SentencePieceLike(), "ab c") == [3, 2]
