"""The Python API (m3cli/api.py): the example of docs/python.md runs as written, and the calls
give what the commands give."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import m3

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "samples" / "model"
CORPUS = ROOT / "samples" / "corpus.jsonl"


def docs_example() -> str:
    page = (ROOT / "docs" / "python.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_documented_example_runs_as_written(tmp_path):
    code = docs_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    shutil.copy(CORPUS, tmp_path / "corpus.jsonl")
    env = {**os.environ, "M3_MODEL": str(SAMPLE), "HF_HUB_OFFLINE": "1"}
    env.pop("M3_BANK", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert "Ilsa Varenkov" in first.split(")")[0]  # the best hit is her document
    assert "Ilsa Varenkov" in second  # the answer read her memory
    assert (tmp_path / "kb.m3bank").is_file()


def test_the_api_gives_what_the_commands_give(tmp_path):
    import m3cli.encoding  # noqa: F401 — a submodule loaded first must not shadow the API's names
    from m3cli import Bank, Model, encode

    assert callable(encode) and isinstance(Bank, type) and isinstance(Model, type)
    from m3cli.errors import M3Error

    docs = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    info = encode(iter(docs), tmp_path / "kb.m3bank", model=SAMPLE)
    assert info["documents"] == len(docs) and info["index"]["factory"] == "Flat"
    with pytest.raises(M3Error, match="already exists"):
        encode(iter(docs), tmp_path / "kb.m3bank", model=SAMPLE)
    cli = json.loads(
        m3(
            "search", "--bank", tmp_path / "kb.m3bank", "Where was Ilsa Varenkov born?", "--memories", "3", "--json"
        ).stdout
    )["results"]
    with Bank.open(tmp_path / "kb.m3bank") as bank:
        assert bank.references >= len(docs) and bank.documents == len(docs)
        hits = bank.search("Where was Ilsa Varenkov born?", k=3)
        assert [h.ref for h in hits] == [h["ref"] for h in cli]
        assert len(bank.search(["a", "b"], k=2)) == 2
        model = Model.load(SAMPLE, bank=bank)
        assert model.fingerprint == bank.fingerprint
        answers = model.generate(
            ["Where was Ilsa Varenkov born?", "Who founded Northwind?"], bank=bank, max_new_tokens=6
        )
        assert len(answers) == 2 and all(a.new_tokens <= 6 for a in answers)
        assert answers[0].references and all(r.attention is not None for r in answers[0].references)
        closed = model.generate("Where was Ilsa Varenkov born?", max_new_tokens=6)
        assert closed.references == [] and closed.finish_reason in ("eos", "length")
        cli_text = json.loads(
            m3(
                "generate",
                "--model",
                SAMPLE,
                "--bank",
                tmp_path / "kb.m3bank",
                "-n",
                "6",
                "--json",
                "Where was Ilsa Varenkov born?",
            ).stdout
        )["text"]
        assert answers[0].text == cli_text
        assert model.score("Ilsa Varenkov was born in Port Adler.", bank=bank)["perplexity"] > 1
        with pytest.raises(M3Error, match="needs a bank"):
            model.generate("x", mode="rag")
    other = tmp_path / "other"
    assert (
        m3("pretrain", CORPUS, "-o", other, "--preset", "tiny", "--steps", "1", "--seq-len", "32", "-q").exit_code == 0
    )
    with Bank.open(tmp_path / "kb.m3bank") as bank, pytest.raises(M3Error, match="re-encode"):
        Model.load(other, bank=bank)
