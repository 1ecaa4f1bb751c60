"""Running the CLI in-process and checking how it fails."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def kill_after_checkpoint(args, output: Path, step: int, timeout: float = 300) -> None:
    """Run `m3 ARGS -o OUTPUT` as a process and SIGKILL it once its checkpoint reaches `step`;
    fails if it finished first or left a half-written OUTPUT."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "m3cli", *[str(a) for a in args], "-o", str(output)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = output.with_name(output.name + ".train") / "checkpoint" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not output.exists()


def accelerate_m3(*args, processes: int = 2, timeout: float = 600):
    """Run `m3 ARGS…` as `processes` CPU processes through `accelerate launch`."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "m3cli",
        *[str(a) for a in args],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
