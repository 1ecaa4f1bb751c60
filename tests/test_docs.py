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
    documented = set(re.findall(r"`m3 ([a-z]+)", table))
    assert documented == cli_commands()


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


def test_closed_pipe_ends_quietly():
    """`m3 … | head -1` in a pipeline: no traceback when the reader goes away."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "m3cli", "inspect", "memory3-2.4b"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader is gone before m3 finishes writing
    err = proc.stderr.read().decode()
    proc.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
