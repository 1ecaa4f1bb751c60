"""`m3 add`, `m3 remove`, `m3 compact`: banks that change without being re-encoded."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from m3cli.bank import Bank

from cli_helpers import assert_user_error, encoded_bank, m3

DOCS = [
    {"id": "fr", "title": "France", "text": "the capital of france is paris ."},
    {"id": "it", "title": "Italy", "text": "the capital of italy is rome ."},
    {"id": "hw", "title": "Greeting", "text": "hello world , the memory model answers a question ."},
]
MORE = [
    {"id": "de", "title": "Germany", "text": "the capital of germany is berlin . berlin is a large city ."},
    {"id": "es", "title": "Spain", "text": "the capital of spain is madrid ."},
]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def search(path, query, memories=10):
    result = m3("search", path, query, "--json", "--memories", memories)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


def leftovers(path):
    """Files an update left beside the bank (spools, temporary files, locks)."""
    return [p.name for p in path.parent.iterdir() if f".{path.name}" in p.name]


def encode(model, path, docs, *args):
    """Encode `docs` with an m3 model dir into `path` (no index): the bank a fresh encode gives."""
    corpus = write_jsonl(path.with_suffix(".jsonl"), docs)
    result = m3("encode", corpus, "-o", path, "-m", model, "-q", "--index", "none", *args)
    assert result.exit_code == 0, result.output
    return path


def verify(path):
    result = m3("inspect", path, "--verify")
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def bank(llama_dir, tmp_path):
    return encoded_bank(llama_dir[0], tmp_path, DOCS)


def test_add_remove_compact_round_trip(bank, tmp_path):
    path, model = bank
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    result = m3("add", path, more, "-m", model, "-q", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["added_documents"], info["replaced_documents"], info["documents"], info["segment"]) == (2, 0, 5, 1)
    verify(path)
    hits = search(path, MORE[1]["text"])
    assert hits[0]["doc_id"] == "es" and hits[0]["text"] == MORE[1]["text"]
    assert {h["doc_id"] for h in hits} == {"fr", "it", "hw", "de", "es"}  # one result list over both segments

    # the added memories are exactly what a fresh encode of the same documents stores
    fresh = encode(model, tmp_path / "fresh.m3bank", DOCS + MORE)
    with Bank(path) as added, Bank(fresh) as whole:
        assert added.n_refs == whole.n_refs and added.header["m3.bank.tokens"] == whole.header["m3.bank.tokens"]
        assert torch.equal(added.memories(range(added.n_refs)).kv, whole.memories(range(whole.n_refs)).kv)
        assert [added.reference(i) for i in range(added.n_refs)] == [whole.reference(i) for i in range(whole.n_refs)]
        assert [added.document(j) for j in range(added.n_docs)] == [whole.document(j) for j in range(whole.n_docs)]

    # ids are unique: adding one again is refused and changes nothing; --replace replaces it
    before = path.read_bytes()
    assert_user_error(m3("add", path, more, "-m", model, "-q"), "already holds a document with id 'de'", "--replace")
    assert path.read_bytes() == before
    revised = write_jsonl(tmp_path / "rev.jsonl", [{"id": "es", "title": "Spain", "text": "spain has a long coast ."}])
    result = m3("add", path, revised, "-m", model, "-q", "--replace", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["replaced_documents"] == 1, result.output
    texts = [h["text"] for h in search(path, "capital of spain madrid", 20)]
    assert "spain has a long coast ." in texts and MORE[1]["text"] not in texts

    # removed documents are never retrieved, whatever the number of memories asked for
    result = m3("remove", path, "--doc", "fr", "--doc", "de", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed_documents"] == 2
    verify(path)
    for query in ("the capital of france is paris .", MORE[0]["text"]):
        assert not {h["doc_id"] for h in search(path, query, 50)} & {"fr", "de"}
        assert len(search(path, query, 1)) == 1  # the best live reference, though removed ones score higher
    assert_user_error(m3("remove", path, "--doc", "fr"), "no document with id 'fr'")
    gen = m3("generate", "--bank", path, "-m", model, "capital of germany", "-n", "2", "--memories", "20", "--json")
    assert gen.exit_code == 0, gen.output
    read = {r["doc_id"] for c in json.loads(gen.stdout)["chunks"] for r in c["references"]}
    assert read == {"it", "hw", "es"}  # every live document, none removed

    # compact: one segment, no removed bytes, the same answers
    live = {q: [(h["doc_id"], h["text"]) for h in search(path, q)] for q in ("capital of italy", "hello world")}
    result = m3("compact", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["compacted"] and info["documents"] == 3 and info["bytes_after"] < info["bytes_before"]
    verify(path)
    with Bank(path) as b:
        assert len(b.segments) == 1 and not b.removed.size and b.version == (1, 1)
        assert [b.document(j).id for j in range(b.n_docs)] == ["it", "hw", "es"]
    assert {q: [(h["doc_id"], h["text"]) for h in search(path, q)] for q in live} == live
    assert json.loads(m3("compact", path, "--json").stdout)["compacted"] is False


def test_vq_bank_grows_with_its_own_codebooks(llama_dir, tmp_path):
    path, model = encoded_bank(llama_dir[0], tmp_path, DOCS, "--codec", "vq")
    with Bank(path) as b:
        books = b.verified("codec.vq")
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    assert m3("add", path, more, "-m", model, "-q").exit_code == 0
    verify(path)
    assert search(path, MORE[0]["text"])[0]["doc_id"] == "de"
    exact = encode(model, tmp_path / "exact.m3bank", DOCS + MORE)
    with Bank(path) as b, Bank(exact) as e:
        assert b.verified("codec.vq") == books  # codebooks unchanged: old codes keep their meaning
        new = range(e.n_refs - 3, e.n_refs)
        err = (b.memories(new).kv - e.memories(new).kv).abs().mean() / e.memories(new).kv.abs().mean()
        assert err < 0.5, err  # quantized, not garbage
    assert m3("remove", path, "--doc", "it").exit_code == 0
    assert m3("compact", path, "-q").exit_code == 0
    verify(path)
    with Bank(path) as b:
        assert b.codec == "vq" and b.verified("codec.vq") == books and b.n_docs == 4


def test_unindexed_bank_then_index_folds_segments(llama_dir, tmp_path):
    path, model = encoded_bank(llama_dir[0], tmp_path, DOCS, "--index", "none")
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    assert m3("add", path, more, "-m", model, "-q").exit_code == 0
    assert m3("remove", path, "--doc", "hw").exit_code == 0
    verify(path)
    result = m3("index", path, "-q", "--json")
    assert result.exit_code == 0, result.output
    with Bank(path) as b:
        assert len(b.segments) == 1 and b.n_docs == 4 and "hw" not in [b.document(j).id for j in range(4)]
    assert search(path, MORE[0]["text"])[0]["doc_id"] == "de"


def test_bad_input_changes_nothing(bank, tmp_path, qwen_dir):
    path, model = bank
    before = path.read_bytes()
    twice = write_jsonl(tmp_path / "twice.jsonl", [MORE[0], MORE[0]])
    assert_user_error(m3("add", path, twice, "-m", model, "-q"), "id 'de' twice")
    assert_user_error(m3("add", path, tmp_path / "nope.jsonl", "-m", model, "-q"), "does not exist")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": "x", "text": ""}])
    assert_user_error(m3("add", path, empty, "-m", model, "-q"), "no text")
    assert_user_error(m3("remove", path), "--doc")
    other = tmp_path / "other-model"
    assert m3("convert", qwen_dir[0], "-o", other).exit_code == 0
    assert_user_error(m3("add", path, write_jsonl(tmp_path / "m.jsonl", MORE), "-m", other, "-q"), "re-encode")
    assert path.read_bytes() == before
    assert not leftovers(path)


def _add_process(path, corpus, model, crash_at):
    env = {**os.environ, "M3_CRASH_AT": crash_at, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "m3cli", "add", str(path), str(corpus), "-m", str(model), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("crash_at", ["add:encoded", "update:appended", "update:switched", "rename"])
def test_a_killed_update_leaves_the_old_bank_or_the_new_one(bank, tmp_path, crash_at):
    """SIGKILL at each step of an update: the bank verifies and is either the old one or the new
    one; running the command again finishes the job (or finds it done)."""
    path, model = bank
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    if crash_at == "rename":  # the whole-file path: compaction after a removal
        assert m3("add", path, more, "-m", model, "-q").exit_code == 0
        assert m3("remove", path, "--doc", "fr").exit_code == 0
        env = {**os.environ, "M3_CRASH_AT": "rename"}
        proc = subprocess.run([sys.executable, "-m", "m3cli", "compact", str(path)], env=env, capture_output=True)
        assert proc.returncode == -signal.SIGKILL
        verify(path)
        with Bank(path) as b:
            assert len(b.segments) == 2 and b.removed.tolist() == [0]  # the old bank
        assert m3("compact", path, "-q").exit_code == 0
        verify(path)
        assert not leftovers(path)  # the killed run's temporary file was swept under the lock
        return
    proc = _add_process(path, more, model, crash_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    verify(path)
    with Bank(path) as b:
        n_docs = b.n_docs
    assert n_docs == (5 if crash_at == "update:switched" else 3)
    again = m3("add", path, more, "-m", model, "-q")
    if crash_at == "update:switched":
        assert_user_error(again, "already holds")
    else:
        assert again.exit_code == 0, again.output
    verify(path)
    assert search(path, MORE[0]["text"])[0]["doc_id"] == "de"
    with Bank(path) as b:
        assert b.n_docs == 5
    assert not leftovers(path)
