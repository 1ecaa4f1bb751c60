"""README and --help stay true to the CLI."""

import re
from pathlib import Path

from typer.main import get_command
from typer.testing import CliRunner

from m3cli.cli import app

README = (Path(__file__).parent.parent / "README.md").read_text()
runner = CliRunner()


def cli_commands() -> set[str]:
    return set(get_command(app).commands)


def test_readme_command_table_matches_the_cli():
    table = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`m3 ([a-z][a-z-]*)", table))
    assert documented == cli_commands()


def test_readme_command_table_names_only_real_options():
    """Every --flag in a command's row of the README table is an option of that command."""
    table = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    commands = get_command(app).commands
    checked = 0
    for row in table.splitlines():
        m = re.match(r"\| `m3 ([a-z][a-z-]*)", row)
        if not m:
            continue
        known = {o for p in commands[m.group(1)].params for o in (*p.opts, *p.secondary_opts)}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", row):
            assert flag in known, f"README: m3 {m.group(1)} has no option {flag}"
            checked += 1
    assert checked > 30


def test_every_command_has_help_with_an_example_or_says_it_is_not_ready():
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for name in cli_commands():
        assert name in top.stdout
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Examples" in result.stdout or "not available yet" in result.stdout, name


def test_readme_names_the_two_setup_commands():
    assert "make demo" in README and "make test" in README


def test_closed_pipe_ends_quietly(monkeypatch):
    """`m3 … | head -1`: when the reader goes away, main() exits 1 without a traceback and points
    stdout at /dev/null so that Python's final flush cannot fail again."""
    import io
    import os

    import pytest

    import m3cli.cli as cli

    def gone():
        raise BrokenPipeError(32, "Broken pipe")

    redirected = []

    class Stdout(io.StringIO):
        def fileno(self):
            return 12345

    monkeypatch.setattr(cli, "app", gone)
    monkeypatch.setattr(cli.sys, "stdout", Stdout())
    monkeypatch.setattr(os, "dup2", lambda src, dst: redirected.append(dst))
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1 and redirected == [12345]


def test_shell_completion_and_python_dash_m():
    """`m3 --install-completion` installs what this answers: bash completion of commands and options."""
    import os
    import subprocess
    import sys

    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_M3_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        script = Path(sys.executable).parent / "m3"  # the installed entry point completion is for
        out = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("m3 gen", 1) == ["generate"]
    assert complete("m3 pretrain --reader", 2) == ["--reader-rank"]
    version = subprocess.run([sys.executable, "-m", "m3cli", "--help"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and "generate" in version.stdout


def test_files_the_docs_name_exist():
    """Every repository path the README, format_spec.md and docs/ name in code quotes exists."""
    root = Path(__file__).parent.parent
    not_yet = {"m3cli/data/reader-smollm2.safetensors"}  # the shipped memory reader, once #22 trains one
    missing = []
    for doc in [root / "README.md", root / "format_spec.md", *sorted((root / "docs").glob("*.md"))]:
        for path in re.findall(
            r"`((?:tests|scripts|bench|docs|m3cli|samples)/[A-Za-z0-9_./-]*[A-Za-z0-9_])`", doc.read_text()
        ):
            if path not in not_yet and not (root / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing


def test_every_readme_code_block_is_run_somewhere():
    """The README's bash blocks: the set-up block is what CI itself runs (`make test`, after `make
    setup`; `make demo` is the same set-up plus scripts/demo.sh), and the blocks of "Use it on your
    documents" and "Serve over HTTP" are run line by line by tests/test_usedby.py. A new block
    needs a test too."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
    used_by = "".join(
        README.split(f"## {h}", 1)[1].split("\n## ", 1)[0] for h in ("Use it on your documents", "Serve over HTTP")
    )
    python_example = re.findall(
        r"```python\n(.*?)```", (Path(__file__).parent.parent / "docs" / "python.md").read_text(), flags=re.S
    )
    for lang, body in blocks:
        if lang == "python":  # tests/test_api.py runs docs/python.md's example, which this must be
            assert [body] == python_example
            continue
        assert lang == "bash", f"README code block in {lang or 'no language'}: say what runs it"
        lines = [line.split("  # ")[0].strip() for line in body.splitlines() if line.strip()]
        if lines == ["make demo", "make test"]:
            continue
        assert f"```bash\n{body}```" in used_by, f"README block not run by any test: {lines[:2]}"
    assert (
        sum(
            lines == ["make demo", "make test"]
            for lines in ([x.split("  # ")[0].strip() for x in b.splitlines() if x.strip()] for _, b in blocks)
        )
        == 1
    )


def test_recorded_outputs_come_from_the_script_that_writes_them():
    """docs/cli-examples.md is written by scripts/cli_examples.py: its commands are the script's,
    in order (the outputs under them are what running the script printed)."""
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    listed = subprocess.run(
        [sys.executable, str(root / "scripts" / "cli_examples.py"), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    page = (root / "docs" / "cli-examples.md").read_text()
    shown = [line[2:] for line in page.splitlines() if line.startswith("$ ")]
    assert shown == listed.stdout.splitlines() and len(shown) >= 10
