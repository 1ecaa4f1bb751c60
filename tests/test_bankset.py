"""Bank sets: shards written in parallel, one manifest, one index, read like one bank."""

import json

import pytest

from m3cli.bank import Bank, BankError
from m3cli.bankset import MANIFEST

from cli_helpers import accelerate_m3, assert_user_error, m3

WORDS = "the capital of france is paris rome italy city country born hello world memory model".split()


def corpus(path, n=23):
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(4 + i % 9)) + f" item {i} ."
            f.write(json.dumps({"id": f"d{i}", "title": f"t{i}", "text": text}) + "\n")
    return path


@pytest.fixture
def model(llama_dir, tmp_path):
    out = tmp_path / "m3-model"
    assert m3("convert", llama_dir[0], "-o", out).exit_code == 0
    return out


def hits(bank, query, k=5):
    result = m3("search", bank, query, "--json", "--memories", k)
    assert result.exit_code == 0, result.output
    return [(h["doc_id"], h["text"], round(h["score"], 4)) for h in json.loads(result.stdout)["results"]]


def test_two_processes_write_a_set_that_reads_like_one_bank(model, tmp_path):
    docs = corpus(tmp_path / "c.jsonl")
    single, kbset = tmp_path / "single.m3bank", tmp_path / "kb.m3set"
    assert m3("encode", docs, "-o", single, "-m", model, "-q").exit_code == 0
    result = accelerate_m3("encode", docs, "-o", kbset, "-m", model, "-q", "--index", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in kbset.iterdir() if not p.name.endswith(".key.json")) == [
        MANIFEST,
        "shard-g0001-00000-of-00002.m3bank",
        "shard-g0001-00001-of-00002.m3bank",
    ]
    indexed = m3("index", kbset, "-q", "--json")  # one index over both shards
    assert indexed.exit_code == 0, indexed.output
    assert json.loads(indexed.stdout)["shards"] == 2
    verified = m3("inspect", kbset, "--verify")
    assert verified.exit_code == 0 and "2 shards" in verified.stdout, verified.output
    info = json.loads(m3("inspect", kbset, "--json").stdout)
    assert (info["kind"], info["documents"], len(info["shards"])) == ("bank set", 23, 2)

    with Bank(single) as one, Bank(kbset) as many:
        assert many.is_set and (many.n_refs, many.n_docs) == (one.n_refs, one.n_docs)
        assert many.header["m3.bank.tokens"] == one.header["m3.bank.tokens"]
        # shard 0 holds documents 0, 2, 4, …: the same memories as the single bank's
        by_id = {one.document(j).id: j for j in range(one.n_docs)}
        for j in range(many.n_docs):
            d = many.document(j)
            a = one.memories(range(one.document(by_id[d.id]).first_ref, one.document(by_id[d.id]).first_ref + d.n_refs))
            b = many.memories(range(d.first_ref, d.first_ref + d.n_refs))
            assert (a.kv - b.kv).abs().max() < 1e-2 and (a.positions == b.positions).all()
    for query in ("the capital of france", "rome italy city", "item 7", "hello world memory"):
        assert hits(single, query) == hits(kbset, query)
    gen = [
        json.loads(m3("generate", "--bank", bank, "-m", model, "capital of italy", "-n", "4", "--json").stdout)
        for bank in (single, kbset)
    ]
    assert gen[0]["text"] == gen[1]["text"]
    assert [[r["doc_id"] for r in c["references"]] for c in gen[0]["chunks"]] == [
        [r["doc_id"] for r in c["references"]] for c in gen[1]["chunks"]
    ]

    # a set is re-encoded, not edited; a damaged manifest or shard is one line
    assert_user_error(m3("add", kbset, docs, "-m", model, "-q"), "bank set")
    manifest = json.loads((kbset / MANIFEST).read_text())
    shard0 = manifest["shards"][0]
    (kbset / "link.m3bank").symlink_to(kbset / shard0["file"])  # the same counts: only the link is wrong
    index = manifest["index"]
    for bad, fragment in (
        ({**manifest, "shards": [{**shard0, "file": "../single.m3bank"}]}, "shard entry"),
        ({**manifest, "shards": [{**shard0, "file": "link.m3bank"}]}, "not a regular file"),
        ({**manifest, "shards": [{**shard0, "file": shard0["file"] + "\n"}]}, "shard entry"),
        ({**manifest, "shards": [{**shard0, "references": 99}]}, "the manifest says"),
        ({**manifest, "version": 7}, "version"),
        ({**manifest, "index": {**index, "sha256": "0" * 64}}, "SHA-256"),
        ({**manifest, "index": {**index, "bytes": index["bytes"] + 1}}, "bytes the manifest says"),
        ({**manifest, "index": {**index, "header": {**index["header"], "m3.index.ef_search": 2**40}}}, "ef_search"),
    ):
        (kbset / MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(BankError, match=fragment):
            with Bank(kbset) as b:
                from m3cli.retrieval import load_index

                load_index(b)
    (kbset / MANIFEST).write_text(json.dumps(manifest))
    (kbset / "link.m3bank").unlink()
    assert m3("inspect", kbset, "--verify").exit_code == 0
    assert_user_error(m3("compact", kbset / shard0["file"]), "shard of the bank set")

    # a re-encode writes new shards beside the old ones: one that fails leaves the old set whole
    before = (kbset / MANIFEST).read_bytes()
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "x", "text": ""}) + "\n")
    assert m3("encode", empty, "-o", kbset, "-m", model, "-q", "--force").exit_code != 0
    assert (kbset / MANIFEST).read_bytes() == before and m3("inspect", kbset, "--verify").exit_code == 0
    assert hits(single, "item 7") == hits(kbset, "item 7")


def test_one_process_writes_a_one_shard_set_and_force_replaces_it(model, tmp_path):
    docs = corpus(tmp_path / "c.jsonl", n=5)
    kbset = tmp_path / "kb.m3set"
    assert m3("encode", docs, "-o", kbset, "-m", model, "-q").exit_code == 0
    third = json.loads(docs.read_text().splitlines()[3])["text"]
    assert hits(kbset, third)[0][:2] == ("d3", third)
    assert_user_error(m3("encode", docs, "-o", kbset, "-m", model, "-q"), "already exists")
    (kbset / "notes.txt").write_text("mine")
    assert m3("encode", docs, "-o", kbset, "-m", model, "-q", "--force").exit_code == 0
    assert (kbset / "notes.txt").read_text() == "mine"  # --force replaces the set, nothing else in the dir
    assert m3("inspect", kbset, "--verify").exit_code == 0


def test_a_vq_set_decodes_each_shard_with_its_own_codebooks(model, tmp_path):
    """Memories read across shards: each shard's codes through its own codebooks, the same as
    each shard read alone."""
    docs = corpus(tmp_path / "c.jsonl", n=12)
    kbset = tmp_path / "kb.m3set"
    result = accelerate_m3("encode", docs, "-o", kbset, "-m", model, "-q", "--codec", "vq", "--vq-subquantizers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    with Bank(kbset) as many:
        a, b = many._parts
        assert a.verified("codec.vq") != b.verified("codec.vq")  # each trained on its own share
        both = many.memories([a.n_refs - 1, a.n_refs, 0, many.n_refs - 1])
        alone = [a.memories([a.n_refs - 1]), b.memories([0]), a.memories([0]), b.memories([b.n_refs - 1])]
        for j, one in enumerate(alone):
            assert (both.kv[j] == one.kv[0]).all() and (both.positions[j] == one.positions[0]).all()
        assert many.memories([]).kv.shape[0] == 0
    assert m3("inspect", kbset, "--verify").exit_code == 0
