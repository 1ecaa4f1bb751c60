"""Write docs/cli-examples.md: each command below run for real (the shipped sample model, a
synthetic knowledge base) and its output recorded, so the page shows what m3 prints today rather
than what someone pasted once.

    .venv/bin/python scripts/cli_examples.py            # about 3 minutes on a 2-core CPU
    .venv/bin/python scripts/cli_examples.py --list     # the commands only (tests/test_docs.py)

Commands run from the repository root with .venv/bin first on PATH; their files go to
out/examples/. Long outputs keep their first lines (the page says how many were left out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = "out/examples"
Q = f"$(head -1 {OUT}/synth/qa_unseen.jsonl | jq -r .question)"  # a person the model never saw
FACT = f'$(head -1 {OUT}/synth/qa_unseen.jsonl | jq -r \'.title + " was born in " + .answer + "."\')'

# (heading, command, lines kept)
COMMANDS = [
    ("A model", "m3 inspect samples/model", 20),
    (
        "A preset at the paper's shape",
        "m3 inspect memory3-2.4b --json | jq '{parameters, memory_shape, memory_bytes_bf16}'",
        20,
    ),
    ("A synthetic knowledge task", f"m3 synth -o {OUT}/synth --people 400 --seed 0 --force", 5),
    ("Its first unseen question", f"head -1 {OUT}/synth/qa_unseen.jsonl", 3),
    (
        "Encode the knowledge base",
        f"m3 encode {OUT}/synth/kb.parquet -o {OUT}/kb.m3bank --model samples/model --force -q",
        5,
    ),
    ("What the bank holds", f"m3 inspect {OUT}/kb.m3bank", 40),
    ("Every checksum and record", f"m3 inspect {OUT}/kb.m3bank --verify", 10),
    ("One reference's memory", f"m3 inspect {OUT}/kb.m3bank --ref 0 --model samples/model", 14),
    ("Search", f'm3 search --bank {OUT}/kb.m3bank "{Q}" --memories 3', 10),
    (
        "Generate, with the memories each chunk read",
        f'm3 generate --model samples/model --bank {OUT}/kb.m3bank --explain -n 8 "Question: {Q} Answer:"',
        20,
    ),
    (
        "Closed book, memory and RAG on the same questions",
        f"m3 eval --model samples/model --bank {OUT}/kb.m3bank --qa {OUT}/synth/qa_unseen.jsonl --limit 40 --show 2",
        20,
    ),
    (
        "Perplexity of a true sentence, with and without memory",
        f"for mode in none memory; do m3 score --model samples/model --bank {OUT}/kb.m3bank --mode $mode --json \"{FACT}\" | jq -c '{{mode, perplexity}}'; done",
        4,
    ),
    ("Another index", f"m3 index {OUT}/kb.m3bank --factory HNSW32 --json", 4),
    (
        "Speed, side by side",
        f"m3 bench --model samples/model --bank {OUT}/kb.m3bank --batch-size 1,8 --prompt-len 64 --max-new-tokens 32 --repeats 1 2>/dev/null",
        14,
    ),
    (
        "A few training steps from scratch",
        f"m3 pretrain {OUT}/synth/train.parquet -o {OUT}/tiny --preset tiny --steps 20 --force -q --json | jq -c '{{stage, steps, final_loss}}'",
        4,
    ),
    ("Bad input: one line, exit status 1", f'm3 generate --bank {OUT}/missing.m3bank "x"', 3),
    ("A wrong command line: one line, exit status 2", 'm3 search --memories many "x"', 3),
]


def run(command: str, keep: int, env: dict) -> tuple[str, int]:
    out = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    text = (out.stdout + out.stderr).rstrip("\n")
    lines = text.splitlines()
    if len(lines) > keep:
        lines = lines[:keep] + [f"… ({len(lines) - keep} more lines)"]
    return "\n".join(lines), out.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ap.add_argument("-o", "--output", default=str(ROOT / "docs" / "cli-examples.md"))
    a = ap.parse_args()
    if a.list:
        for _, command, _ in COMMANDS:
            print(command)
        return
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "100",
    }
    env.pop("M3_MODEL", None)
    env.pop("M3_BANK", None)
    (ROOT / OUT).mkdir(parents=True, exist_ok=True)
    parts = [
        "# Command examples",
        "",
        "Each command below was run by `scripts/cli_examples.py` (`.venv/bin/python scripts/cli_examples.py` "
        "rewrites this page) on the shipped sample model (`samples/model`, ~1M parameters, trained on "
        "invented people) and a synthetic knowledge base; long outputs keep their first lines. The reference "
        "for every option is [cli.md](cli.md).",
        "",
    ]
    t0 = time.time()
    for heading, command, keep in COMMANDS:
        text, rc = run(command, keep, env)
        if rc != 0 and "exit status" not in heading:
            raise SystemExit(f"failed ({rc}): {command}\n{text}")
        parts += [f"## {heading}", "", "```console", f"$ {command}", text]
        if rc:
            parts.append(f"(exit status {rc})")
        parts += ["```", ""]
        print(f"[{time.time() - t0:.0f}s] {command[:90]}", file=sys.stderr)
    tmp = Path(a.output + ".tmp")
    tmp.write_text("\n".join(parts).rstrip() + "\n")
    tmp.replace(a.output)


if __name__ == "__main__":
    main()
