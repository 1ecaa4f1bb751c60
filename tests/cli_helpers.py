"""Running the CLI in-process and checking how it fails."""

import json

from typer.testing import CliRunner

from m3cli.cli import app

runner = CliRunner()


def m3(*args, input=None):
    """Invoke `m3 ARGS…` in-process; returns click's Result (stdout and stderr kept apart)."""
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_user_error(result, *fragments):
    """A user mistake: exit status 1, one line on stderr starting `m3: error:`, no traceback."""
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("m3: error:") and "\n" not in err and "Traceback" not in result.output, err
    for fragment in fragments:
        assert fragment in err, err


def encoded_bank(hf_dir, tmp_path, docs, *encode_args):
    """Convert the tiny HF checkpoint into tmp_path/m3-model and encode `docs` (dicts with id,
    title, text) into tmp_path/kb.m3bank with `m3 encode` (indexed by default).
    Returns (bank path, model dir)."""
    model = tmp_path / "m3-model"
    assert m3("convert", hf_dir, "-o", model).exit_code == 0
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = tmp_path / "kb.m3bank"
    result = m3("encode", corpus, "-o", path, "-m", model, "-q", *encode_args)
    assert result.exit_code == 0, result.output
    return path, model
