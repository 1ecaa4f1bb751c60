"""Every example in every `m3 … --help` runs, as written, in one working directory.

The directory holds what the examples name: a small Hugging Face checkpoint at
./SmolLM2-135M-Instruct (a tiny Llama with a word-level tokenizer and a chat template: the
examples' commands, not their model, are under test), a corpus in Parquet, JSONL, a folder of
notes and a text file, questions, and the recipes. M3_MODEL points at the model the first
example converts, as a user's environment would. Commands run in the order below, each one's
examples in the order its --help shows them, so later examples use what earlier ones wrote
(`models/smollm2`, `kb.m3bank`, `out/synth`)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from conftest import build_hf_checkpoint
from m3cli.cli import app

ROOT = Path(__file__).parent.parent
M3_BIN = Path(sys.executable).parent / "m3"
ORDER = [
    "convert",
    "encode",
    "inspect",
    "index",
    "search",
    "score",
    "generate",
    "eval",
    "add",
    "remove",
    "compact",
    "serve",
    "bench",
    "synth",
    "pretrain",
    "distill-embedder",
]
JQ_SHIM = r"""
import json, sys
import jq
args = [a for a in sys.argv[1:]]
raw = "-r" in args
prog = [a for a in args if not a.startswith("-")][0]
compiled = jq.compile(prog)
for line in sys.stdin:
    if line.strip():
        for value in compiled.input_value(json.loads(line)).all():
            print(value if raw and isinstance(value, str) else json.dumps(value))
"""


def help_examples() -> dict[str, list[str]]:
    group = get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        lines = (cmd.epilog or "").splitlines()
        assert lines and lines[0] == "Examples:", name
        out[name] = [line.strip() for line in lines[1:] if line.strip()]
    return out


def _sandbox(work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf = work / "SmolLM2-135M-Instruct"
    build_hf_checkpoint(hf, "llama")
    cfg_path = hf / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    sentences = [
        "paris is the capital of france .",
        "rome is the capital of italy .",
        "the reference model was born in paris .",
        "hello world , the memory model is a model of memory .",
        "the answer to the question is rome .",
        "a country is a city and a capital .",
    ]
    docs = [
        {"id": f"d{i}", "title": f"doc {i}", "text": " ".join(sentences[(i + j) % 6] for j in range(3))}
        for i in range(24)
    ]
    pq.write_table(pa.Table.from_pylist(docs), work / "corpus.parquet")
    (work / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:6]))
    (work / "notes").mkdir()
    for i in range(3):
        (work / "notes" / f"n{i}.md").write_text(f"# note {i}\n\n{sentences[i]} {sentences[i + 1]}\n")
    for name, rows in (
        ("more.jsonl", [{"id": "n1", "title": "new 1", "text": sentences[2]}, {"id": "n2", "text": sentences[4]}]),
        ("revised.jsonl", [{"id": "d1", "title": "doc 1", "text": sentences[5]}]),
        ("new.jsonl", [{"id": "n3", "title": "new 3", "text": sentences[0]}]),
    ):
        (work / name).write_text("".join(json.dumps(d) + "\n" for d in rows))
    (work / "doc.txt").write_text("paris is the capital of france .\n")
    (work / "questions.txt").write_text("what is the capital of france ?\nwho was born in paris ?\n")
    (work / "qa.jsonl").write_text(
        '{"question": "what is the capital of france ?", "answer": "paris"}\n'
        '{"question": "what is the capital of italy ?", "answer": "rome"}\n'
    )
    shutil.copytree(ROOT / "recipes", work / "recipes")
    path = f"{M3_BIN.parent}:{os.environ['PATH']}"
    if shutil.which("jq") is None:  # the real jq, through its Python binding (a dev dependency)
        shim = work.parent / "bin" / "jq"
        shim.parent.mkdir(exist_ok=True)
        shim.write_text(f"#!{sys.executable}\n" + JQ_SHIM)
        shim.chmod(0o755)
        path = f"{shim.parent}:{path}"
    env = {k: v for k, v in os.environ.items() if k not in ("M3_MODEL", "M3_BANK")}
    env.update(M3_MODEL="models/smollm2", HF_HUB_OFFLINE="1", PATH=path, PYTHONUNBUFFERED="1")
    return env


def test_every_command_has_examples_and_the_order_covers_them():
    examples = help_examples()
    assert sorted(examples) == sorted(ORDER)
    assert all(examples[name] for name in ORDER)


@pytest.mark.slow
def test_every_help_example_runs_as_written(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = _sandbox(work)
    examples = help_examples()
    ran = 0
    try:
        for name in ORDER:
            for line in examples[name]:
                out = subprocess.run(
                    ["bash", "-c", f"set -o pipefail; {line}"],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                assert out.returncode == 0, (line, out.stdout[-2000:], out.stderr[-4000:])
                assert "Traceback" not in out.stderr, (line, out.stderr[-4000:])
                if "| jq" in line or "--json" in line:
                    assert out.stdout.strip(), line  # a JSON example printed something
                ran += 1
    finally:  # a server an example started and a failure left running
        if (work / "serve.pid").is_file():
            subprocess.run(["bash", "-c", 'kill "$(cat serve.pid)" 2>/dev/null || true'], cwd=work)
    assert ran == sum(len(v) for v in examples.values()) >= 30
