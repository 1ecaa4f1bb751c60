"""The used-by commands with no flags beyond those shown: banks that name their model and
embedder, M3_MODEL / M3_BANK, prompts on stdin, `m3 inspect` alone, the inputs people have,
pipelines (stdout carries only data), and the README's block run verbatim on the default model."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import assert_user_error, m3
from m3cli.corpus import read_corpus

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "samples" / "model"
CORPUS = ROOT / "samples" / "corpus.jsonl"
M3_BIN = Path(sys.executable).parent / "m3"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh cache dir and no M3_MODEL/M3_BANK from the caller's environment."""
    monkeypatch.setenv("M3_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("M3_MODEL", raising=False)
    monkeypatch.delenv("M3_BANK", raising=False)
    return tmp_path / "home"


@pytest.fixture()
def sample_bank(tmp_path, home):
    """samples/corpus.jsonl encoded by a copy of the sample model (so the test can move it)."""
    model = tmp_path / "model"
    shutil.copytree(SAMPLE, model)
    bank = tmp_path / "kb.m3bank"
    result = m3("encode", CORPUS, "-o", bank, "--model", model, "-q")
    assert result.exit_code == 0, result.output
    return bank, model


def test_a_bank_names_its_model_and_commands_given_only_the_bank_use_it(sample_bank, home):
    bank, model = sample_bank
    info = json.loads(m3("inspect", bank, "--json").stdout)
    assert info["model_hint"] == str(model.resolve()) and info["format_version"] == "1.1"
    assert info["embedder"] == "minilm" and info["embedder_hint"] == "minilm" and info["index_factory"] == "Flat"
    result = m3("generate", "--bank", bank, "Ilsa Varenkov was born in", "-n", "6", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["mode"] == "memory" and "Port Adler" in out["text"]  # the sample model reads its memory
    assert out["chunks"][0]["references"][0]["title"] == "Ilsa Varenkov"
    assert not (home / "models").exists()  # the default model was never needed
    score = m3("score", "--bank", bank, "Ilsa Varenkov was born in Port Adler.", "--json")
    assert score.exit_code == 0 and json.loads(score.stdout)["mode"] == "memory"


def test_a_moved_bank_works_with_M3_MODEL_and_a_wrong_model_is_one_line(sample_bank, tmp_path, monkeypatch):
    bank, model = sample_bank
    moved = tmp_path / "elsewhere"
    model.rename(moved)  # the path the bank names is gone, as on another machine
    assert_user_error(
        m3("generate", "--bank", bank, "Ilsa Varenkov was born in", "-n", "2"),
        str(model.resolve()),
        "--model",
        "M3_MODEL",
        "sha256:",
    )
    result = m3("generate", "--bank", bank, "Ilsa Varenkov was born in", "-n", "2", "--model", moved)
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("M3_MODEL", str(moved))
    assert m3("generate", "--bank", bank, "Ilsa Varenkov was born in", "-n", "2").exit_code == 0
    other = tmp_path / "other"  # same architecture, other weights: another fingerprint
    shutil.copytree(moved, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if k.endswith("weight") and weights[k].dim() == 2)
    weights[name] = weights[name] * 1.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setenv("M3_MODEL", str(other))
    assert_user_error(m3("generate", "--bank", bank, "x", "-n", "2"), "encoded by model", "not by this model")


def test_M3_BANK_names_the_bank_and_prompts_come_from_stdin(sample_bank, monkeypatch):
    bank, _ = sample_bank
    monkeypatch.setenv("M3_BANK", str(bank))
    questions = "Ilsa Varenkov was born in\n\nTomas Quillfeather studied\n"
    result = m3("generate", "-n", "6", input=questions)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "Port Adler" in lines[0]  # one line per answer, in order
    result = m3("generate", "-n", "6", "--json", input=questions)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Ilsa Varenkov was born in", "Tomas Quillfeather studied"]
    assert all(r["mode"] == "memory" for r in rows)
    assert_user_error(m3("generate", "-n", "2", input=""), "no prompt")


def test_inspect_alone_describes_the_environment_without_making_the_model(home, monkeypatch):
    result = m3("inspect", "--json")
    assert result.exit_code == 0, result.output
    env = json.loads(result.stdout)
    assert env["kind"] == "environment" and env["cache_dir"] == str(home)
    assert env["default_model"].startswith(str(home / "models")) and env["default_model_ready"] is False
    assert env["model_from"].startswith("default") and (env["device"] == "cpu" or env["device"].startswith("cuda"))
    assert env["versions"]["torch"] and env["embedder"] == "minilm" and Path(env["embedder_dir"]).is_dir()
    from m3cli.embed import cpu_has_bf16

    assert env["cpu_bf16"] is cpu_has_bf16()
    assert not (home / "models").exists()
    monkeypatch.setenv("M3_MODEL", str(SAMPLE))
    env = json.loads(m3("inspect", "--json").stdout)
    assert env["model"] == str(SAMPLE) and env["model_from"] == "M3_MODEL"
    text = m3("inspect").stdout
    assert "default_model" in text and "cache_dir" in text and "versions" in text
    assert_user_error(m3("inspect", "--verify"), "need a bank")


def test_the_inputs_people_have(tmp_path, monkeypatch):
    docs = tmp_path / "notes"
    (docs / "deep" / "er").mkdir(parents=True)
    (docs / "a.md").write_text("# Tea\nIlsa likes tea.\n")
    (docs / "deep" / "er" / "b.txt").write_text("Bob was born in Oslo.")
    (docs / ".hidden.txt").write_text("not read")
    (docs / "image.png").write_bytes(b"\x89PNG")
    got = [(d.id, d.title, d.text) for d in read_corpus(docs)]
    assert got == [
        ("a.md", "a.md", "# Tea\nIlsa likes tea.\n"),
        ("deep/er/b.txt", "deep/er/b.txt", "Bob was born in Oslo."),
    ]
    assert [d.text for d in read_corpus(docs / "a.md")] == ["# Tea\nIlsa likes tea.\n"]
    csv = tmp_path / "c.csv"
    csv.write_text('id,title,text,extra\n7,"A, B","He said ""hi"".\nTwo lines.",x\n8,,Second,\n')
    assert [(d.id, d.title, d.text) for d in read_corpus(csv)] == [
        ("7", "A, B", 'He said "hi".\nTwo lines.'),
        ("8", "", "Second"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("title,body\nx,y\n")
    with pytest.raises(Exception, match="no 'text' column"):
        list(read_corpus(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no text or Markdown files"):
        list(read_corpus(tmp_path / "empty"))
    # standard input: plain text is one document, JSONL stays JSONL
    monkeypatch.delenv("M3_MODEL", raising=False)
    out = tmp_path / "s.m3bank"
    result = m3(
        "encode",
        "-",
        "-o",
        out,
        "--model",
        SAMPLE,
        "--index",
        "none",
        "-q",
        input="Plain text from a pipe. It has two sentences.\n",
    )
    assert result.exit_code == 0, result.output
    assert "1 documents" in result.stdout
    result = m3(
        "encode",
        "-",
        "-o",
        out,
        "--model",
        SAMPLE,
        "--index",
        "none",
        "-q",
        "--force",
        input='\n{"id": "j", "text": "A JSON line."}\n{"id": "k", "text": "Another."}\n',
    )
    assert result.exit_code == 0 and "2 documents" in result.stdout, result.output
    result = m3("encode", docs, "-o", tmp_path / "d.m3bank", "--model", SAMPLE, "-q")
    assert result.exit_code == 0 and "2 documents" in result.stdout, result.output


def test_a_bank_indexed_with_a_static_embedder_is_searched_with_it(sample_bank, tmp_path):
    bank, _ = sample_bank
    emb = tmp_path / "static"
    assert m3("distill-embedder", "-o", emb, "--dims", "32", "-q", "--idf-corpus", CORPUS).exit_code == 0
    assert m3("index", bank, "--embedder", emb, "-q").exit_code == 0
    info = json.loads(m3("inspect", bank, "--json").stdout)
    assert info["embedder"].startswith("static:") and info["embedder_hint"] == str(emb.resolve())
    result = m3("search", bank, "Ilsa Varenkov", "--memories", "1", "--json")  # no --embedder
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["title"] == "Ilsa Varenkov"
    emb.rename(tmp_path / "gone")
    assert_user_error(m3("search", bank, "Ilsa", "--memories", "1"), "--embedder", str(emb.resolve()))
    result = m3("search", bank, "Ilsa Varenkov", "--memories", "1", "--embedder", tmp_path / "gone")
    assert result.exit_code == 0, result.output


def test_the_weights_hash_is_remembered_and_any_change_is_noticed(home, tmp_path, monkeypatch):
    import m3cli.checkpoint as ck

    model = tmp_path / "m"
    shutil.copytree(SAMPLE, model)
    calls = []
    real = ck._file_sha256
    monkeypatch.setattr(ck, "_file_sha256", lambda p: (calls.append(Path(p).name), real(p))[1])
    first = ck.model_fingerprint(model)
    assert calls.count("model.safetensors") == 1 and (home / ck.HASH_CACHE).is_file()
    assert ck.model_fingerprint(model) == first and calls.count("model.safetensors") == 1  # remembered
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, and the old modification time put back: the change time still moves
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ck.model_fingerprint(model) != first and calls.count("model.safetensors") == 2
    (home / ck.HASH_CACHE).write_text("{not json")  # a damaged cache is only a miss
    assert ck.model_fingerprint(model) != first and calls.count("model.safetensors") == 3


def _run(cmd, cwd, env, timeout=900):
    return subprocess.run(
        ["bash", "-c", f"set -o pipefail; {cmd}"], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_stdout_carries_only_data_and_no_bar_goes_into_a_pipe(sample_bank, tmp_path):
    """Run as a real process with pipes: stderr is not a terminal, so no progress bar anywhere."""
    bank, model = sample_bank
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "M3_HOME": str(tmp_path / "home")}
    out = _run(f"'{M3_BIN}' encode '{CORPUS}' -o b2.m3bank --model '{model}' | cat", tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout.startswith("wrote b2.m3bank")
    out = _run(f"'{M3_BIN}' distill-embedder -o e --dims 16 | cat", tmp_path, env)
    assert out.returncode == 0 and "\r" not in out.stderr and "%|" not in out.stderr, out.stderr
    out = _run(
        f"'{M3_BIN}' bench --model tiny --synthetic-refs 50 --batch-size 1 --max-new-tokens 4 --prompt-len 8 "
        "--modes none --repeats 1 | cat",
        tmp_path,
        env,
    )
    assert out.returncode == 0, out.stderr
    assert not any(line.startswith("{") for line in out.stdout.splitlines())  # progress rows went to stderr
    out = _run(f"'{M3_BIN}' search '{bank}' - --memories 1 | head -1", tmp_path, {**env, "PYTHONUNBUFFERED": "1"})
    assert "Traceback" not in out.stderr


def _readme_block(heading: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.split("  # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_readme_block_names_the_used_by_commands_and_three_pipelines():
    lines = _readme_block("Use it on your documents")
    assert "m3 encode corpus.parquet -o kb.m3bank" in lines and "m3 inspect kb.m3bank" in lines
    assert any(line.startswith('m3 generate --bank kb.m3bank "') for line in lines)
    assert "m3 inspect" in lines and sum("| jq" in line for line in lines) == 3


@pytest.mark.slow
def test_the_used_by_commands_run_verbatim_on_the_default_model(tmp_path):
    """In an empty directory with a fresh cache: two `m3 generate` at once both succeed (one
    makes the default model, the other waits for it), then the README's block runs line by line
    exactly as written: encode, generate, inspect, inspect alone, add, remove, compact and the three
    pipelines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = tmp_path / "empty"
    work.mkdir()
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    jq = shutil.which("jq")
    path = f"{M3_BIN.parent}:{os.environ['PATH']}"
    if jq is None:  # the real jq, through its Python binding (a dev dependency), as a command
        shim = tmp_path / "bin" / "jq"
        shim.parent.mkdir()
        shim.write_text(f"#!{sys.executable}\n" + JQ_SHIM)
        shim.chmod(0o755)
        path = f"{shim.parent}:{path}"
    env = {k: v for k, v in os.environ.items() if k not in ("M3_MODEL", "M3_BANK")}
    env.update(M3_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PATH=path)
    procs = [
        subprocess.Popen(
            [str(M3_BIN), "generate", "--mode", "none", "-n", "3", "The capital of France is"],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("materialising the default model" in err for _, err in outs) == 1
    shutil.move(tmp_path / "corpus.parquet", work / "corpus.parquet")
    added = {"id": "doc-0100", "title": "Maren Oakhollow", "text": "Maren Oakhollow was born in Linden Bay in 1988."}
    (work / "more.jsonl").write_text(json.dumps(added) + "\n")  # for the block's m3 add
    ran = {}
    for line in _readme_block("Use it on your documents"):
        out = _run(line, work, env)
        assert out.returncode == 0, (line, out.stdout, out.stderr)
        ran[line] = out.stdout
    bank = json.loads(_run("m3 inspect kb.m3bank --json", work, env).stdout)
    assert bank["model_hint"] == "default" and bank["documents"] == len(rows)  # one added, one removed
    assert (bank["appended_segments"], bank["removed_documents"]) == (0, 0)  # compacted
    found = json.loads(_run('m3 search kb.m3bank "Where was Maren Oakhollow born?" --json', work, env).stdout)
    assert found["results"][0]["doc_id"] == "doc-0100"
    env_info = json.loads(_run("m3 inspect --json", work, env).stdout)
    assert env_info["default_model_ready"] and env_info["default_model_fingerprint"] == bank["model_fingerprint"]
    pipes = [line for line in ran if "| jq" in line]
    assert all(ran[line].strip() for line in pipes), ran
    # the README's server block, as written, on the same bank: start, ask with curl, stop
    served = {}
    try:
        for line in _readme_block("Serve over HTTP"):
            out = _run(line, work, env, timeout=300)
            assert out.returncode == 0, (line, out.stdout, out.stderr, (work / "serve.log").read_text()[-2000:])
            served[line] = out.stdout
    finally:
        if (work / "serve.pid").is_file():
            _run('kill "$(cat serve.pid)" 2>/dev/null || true', work, env)
    answer = next(out for line, out in served.items() if "curl" in line and "chat/completions" in line)
    assert answer.strip().splitlines()[-1] in {r["title"] for r in rows}  # the first reference read


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
