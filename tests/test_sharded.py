"""Sharded encoding: two CPU processes through `accelerate launch` give the bank one process gives."""

import json

import torch

from m3cli.bank import Bank
from cli_helpers import accelerate_m3, m3


def test_two_process_encode_equals_one_process(llama_dir, tmp_path):
    src, _ = llama_dir
    model = tmp_path / "m3-model"
    assert m3("convert", src, "-o", model).exit_code == 0
    corpus = tmp_path / "c.jsonl"
    words = "the capital of france is paris rome italy city country born hello world memory model".split()
    with open(corpus, "w") as f:
        for i in range(41):
            text = " ".join(words[(i * 5 + j) % len(words)] for j in range(4 + i % 9)) + " ."
            f.write(json.dumps({"id": f"d{i}", "title": f"t{i}", "text": text}) + "\n")
    single, sharded = tmp_path / "single.m3bank", tmp_path / "sharded.m3bank"
    assert m3("encode", "--index", "none", corpus, "-o", single, "-m", model, "-q").exit_code == 0
    result = accelerate_m3("encode", "--index", "none", corpus, "-o", sharded, "-m", model, "-q", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # only the main process reports
    assert sorted(p.name for p in tmp_path.iterdir() if "part-" in p.name or p.name.startswith(".")) == []
    with Bank(single) as a, Bank(sharded) as b:
        assert (a.n_docs, a.n_refs) == (b.n_docs, b.n_refs) == (41, 41)
        assert b.verify() == []
        for i in range(a.n_refs):
            assert a.reference(i) == b.reference(i)
        for j in range(a.n_docs):
            assert a.document(j) == b.document(j)
        ma, mb = a.memories(range(a.n_refs)), b.memories(range(b.n_refs))
        assert torch.equal(ma.positions, mb.positions)
        torch.testing.assert_close(ma.kv, mb.kv, atol=1e-2, rtol=1e-2)
        assert {k: v for k, v in a.header.items()} == {k: v for k, v in b.header.items()}
