"""`m3 encode --resume`: a killed encode continues and yields the same bank as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from m3cli.bank_writer import BankWriter
from cli_helpers import m3

WORDS = "the capital of france is paris rome italy city country born hello world memory model answer".split()


def corpus(path, n_docs):
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 23)) + " ."
            f.write(json.dumps({"id": f"d{i}", "title": f"doc {i}", "text": text}) + "\n")
    return path


@pytest.fixture
def model_dir(llama_dir, tmp_path):
    src, _ = llama_dir
    out = tmp_path / "m3-model"
    assert m3("convert", src, "-o", out).exit_code == 0
    return out


def test_interrupted_encode_resumes_to_identical_bytes(model_dir, tmp_path, monkeypatch):
    c = corpus(tmp_path / "c.jsonl", 60)
    reference, target = tmp_path / "ref.m3bank", tmp_path / "kb.m3bank"
    assert (
        m3("encode", "--index", "none", c, "-o", reference, "-m", model_dir, "--batch-size", "4", "-q").exit_code == 0
    )

    real_checkpoint, real_end, calls = BankWriter.checkpoint, BankWriter.end_document, []

    def counting(self, progress):
        real_checkpoint(self, progress)
        calls.append(progress)

    def interrupted(self, *args, **kwargs):  # dies mid-batch, 2 documents after the 3rd checkpoint
        if len(calls) >= 3:
            calls.append("doc")
            if len(calls) == 6:
                raise KeyboardInterrupt
        return real_end(self, *args, **kwargs)

    monkeypatch.setattr(BankWriter, "checkpoint", counting)
    monkeypatch.setattr(BankWriter, "end_document", interrupted)
    monkeypatch.setattr("m3cli.encoding.CHECKPOINT_SECONDS", 0.0)
    result = m3("encode", "--index", "none", c, "-o", target, "-m", model_dir, "--batch-size", "4", "-q")
    assert result.exit_code == 130 and "--resume" in result.stderr
    assert not target.exists() and (tmp_path / ".kb.m3bank.partial").is_dir()
    state = json.loads((tmp_path / ".kb.m3bank.partial" / "state.json").read_text())
    spooled = (tmp_path / ".kb.m3bank.partial" / "kv.data").stat().st_size
    assert spooled > state["sizes"]["kv.data"]  # written past the checkpoint: resume must cut it off
    monkeypatch.setattr(BankWriter, "checkpoint", real_checkpoint)
    monkeypatch.setattr(BankWriter, "end_document", real_end)

    again = m3("encode", "--index", "none", c, "-o", target, "-m", model_dir, "--batch-size", "4", "-q")
    assert again.exit_code == 1 and "--resume" in again.stderr  # no silent restart
    other = m3("encode", "--index", "none", c, "-o", target, "-m", model_dir, "--batch-size", "8", "-q", "--resume")
    assert other.exit_code == 1 and "other inputs or settings" in other.stderr
    resumed = m3("encode", "--index", "none", c, "-o", target, "-m", model_dir, "--batch-size", "4", "-q", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert target.read_bytes() == reference.read_bytes()
    assert not (tmp_path / ".kb.m3bank.partial").exists()


def test_resume_without_partial_starts_fresh_and_force_discards(model_dir, tmp_path):
    c = corpus(tmp_path / "c.jsonl", 10)
    target = tmp_path / "kb.m3bank"
    assert m3("encode", "--index", "none", c, "-o", target, "-m", model_dir, "-q", "--resume").exit_code == 0
    partial = tmp_path / ".x.m3bank.partial"
    partial.mkdir()
    (partial / "junk").write_text("x")
    assert m3("encode", "--index", "none", c, "-o", tmp_path / "x.m3bank", "-m", model_dir, "-q").exit_code == 1
    assert (
        m3("encode", "--index", "none", c, "-o", tmp_path / "x.m3bank", "-m", model_dir, "-q", "--force").exit_code == 0
    )
    assert (tmp_path / "x.m3bank").read_bytes() == target.read_bytes()


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """One model, corpus and uninterrupted reference bank for all kill points."""
    from conftest import build_hf_checkpoint

    tmp = tmp_path_factory.mktemp("kill")
    build_hf_checkpoint(tmp / "hf", "llama")
    model = tmp / "m3-model"
    assert m3("convert", tmp / "hf", "-o", model).exit_code == 0
    c = corpus(tmp / "c.jsonl", 400)
    reference = tmp / "ref.m3bank"
    assert m3("encode", "--index", "none", c, "-o", reference, "-m", model, "--batch-size", "2", "-q").exit_code == 0
    return model, c, reference.read_bytes()


@pytest.mark.parametrize("kill_after_docs", [0, 60, 250])
def test_sigkill_then_resume(kill_setup, tmp_path, kill_after_docs):
    """A real SIGKILL at several points of an encode (0 = before the first checkpoint); the
    target never appears early, and --resume finishes with the bytes of an uninterrupted run."""
    model, c, reference = kill_setup
    target = tmp_path / "kb.m3bank"
    args = [
        sys.executable,
        "-m",
        "m3cli",
        "encode",
        "--index",
        "none",
        str(c),
        "-m",
        str(model),
        "--batch-size",
        "2",
        "-q",
        "-o",
        str(target),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "M3_CHECKPOINT_SECONDS": "0.02"}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    state = tmp_path / ".kb.m3bank.partial" / "state.json"
    spool = tmp_path / ".kb.m3bank.partial"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        assert not target.exists()
        if kill_after_docs == 0 and spool.exists():
            break
        if kill_after_docs and state.exists():
            try:
                if json.loads(state.read_text())["progress"]["docs_done"] >= kill_after_docs:
                    break
            except ValueError:  # caught between write and rename: poll again
                pass
        time.sleep(0.005)
    assert proc.poll() is None, f"encode ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    subprocess.run(args + ["--resume"], env=env, check=True)
    assert target.read_bytes() == reference
    assert not spool.exists()
