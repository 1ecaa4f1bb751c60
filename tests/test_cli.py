"""The command line's contract: exit codes, one-line errors, the option vocabulary, old names
that still work, recipes."""

import json
from pathlib import Path

import pytest
from typer.main import get_command

from cli_helpers import assert_user_error, m3
from m3cli.cli import app
from m3cli.cli.common import DEPRECATED, DEPRECATED_POSITIONAL, click
from m3cli.cli.reference import VOCABULARY
from m3cli.cli.training import read_recipe

ROOT = Path(__file__).parent.parent
COMMANDS = get_command(app).commands


def assert_usage_error(result, *fragments):
    """A wrong command line: exit status 2, one line on stderr starting `m3: usage error:`."""
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("m3: usage error:") and "\n" not in err and "╭" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_usage_errors_are_one_line_with_exit_status_2():
    assert_usage_error(m3("generate", "--no-such-flag"), "--no-such-flag", "m3 generate --help")
    assert_usage_error(m3("search", "--memories", "many", "q"), "--memories")
    assert_usage_error(m3("frobnicate"), "frobnicate")
    assert_usage_error(m3("encode", "corpus.jsonl"), "--output")
    assert_usage_error(m3("synth", "--people", "4"), "--output")


def test_bad_input_is_exit_status_1_and_a_bug_is_exit_status_3(monkeypatch, tmp_path):
    assert_user_error(m3("inspect", tmp_path / "nothing.m3bank"), "nothing.m3bank")
    import m3cli.config

    monkeypatch.setattr(m3cli.config, "PRESETS", None)  # inspect PRESET then fails inside m3
    result = m3("inspect", "tiny")
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("m3: internal error")
    assert "Traceback" in result.stderr


def test_one_name_and_one_short_flag_per_concept():
    old_names = {old for renames in DEPRECATED.values() for old in renames}
    for name, cmd in COMMANDS.items():
        visible = {o for p in cmd.params if isinstance(p, click.Option) and not p.hidden for o in p.opts}
        assert not visible & old_names, name  # old names are accepted, never shown
    for option, _ in VOCABULARY:
        shorts = set()
        users = 0
        for cmd in COMMANDS.values():
            for p in cmd.params:
                if isinstance(p, click.Option) and option in p.opts:
                    shorts.add(tuple(sorted(o for o in p.opts if not o.startswith("--"))))
                    users += 1
        assert users >= 1 and len(shorts) == 1, (option, shorts)
    # every command speaks JSON
    assert all(any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option)) for cmd in COMMANDS.values())


def test_old_names_still_work_with_a_note(tmp_path):
    result = m3("search", "--bank", tmp_path / "none.m3bank", "q", "-k", "3")
    assert "m3: warning: -k is deprecated; use --memories" in result.stderr
    assert result.exit_code == 1 and "none.m3bank" in result.stderr  # parsed as --memories, then the bank
    result = m3("search", "--bank", tmp_path / "none.m3bank", "q", "-k3")
    assert "-k is deprecated" in result.stderr and result.exit_code == 1
    result = m3("bench", "--model", "tiny", "--batch", "x", "--new-tokens", "2")
    assert "--batch is deprecated; use --batch-size" in result.stderr
    assert "--new-tokens is deprecated; use --max-new-tokens" in result.stderr
    assert result.exit_code == 1 and "--batch-size must be comma-separated" in result.stderr
    result = m3("synth", tmp_path / "s", "--people", "20")
    assert result.exit_code == 0, result.output
    assert "m3 synth OUT_DIR is deprecated" in result.stderr and (tmp_path / "s" / "kb.parquet").is_file()
    assert set(DEPRECATED_POSITIONAL) == {"synth", "distill-embedder"}


def test_every_recipe_loads_and_names_real_options():
    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert len(recipes) >= 4
    for path in recipes:
        settings = read_recipe(path, COMMANDS["pretrain"])
        assert settings and set(settings) <= {p.name for p in COMMANDS["pretrain"].params}
        assert path.read_text().startswith("description = ")
    scripts = (ROOT / "scripts" / "proof.sh").read_text() + (ROOT / "scripts" / "train_reader.sh").read_text()
    assert all(f"recipes/{p.name}" in scripts for p in recipes)


def test_recipe_values_are_defaults_that_flags_override(tmp_path, monkeypatch):
    seen = {}
    import m3cli.train

    def fake_pretrain(args, **kw):
        seen["args"] = args
        return {
            "fingerprint": "sha256:" + "0" * 64,
            "output": str(args.output),
            "stage": args.stage,
            "steps": args.steps,
            "final_loss": 1.0,
            "tokens_per_s": 1.0,
            "mean_step_s": 0.1,
            "state_dir": "x",
        }

    monkeypatch.setattr(m3cli.train, "pretrain", fake_pretrain)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'description = "t"\nstage = "continual"\nsteps = 7\nmemories = 2\nalign-docs = true\n'
        "max_overlap = 0.9\nlr = 0.5\n"
    )
    result = m3(
        "pretrain",
        "--config",
        recipe,
        "c.jsonl",
        "-o",
        tmp_path / "m",
        "--init-from",
        tmp_path,
        "--bank",
        tmp_path / "b",
        "--steps",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    a = seen["args"]
    assert (a.stage, a.steps, a.refs_per_chunk, a.align_docs, a.max_overlap, a.lr) == (
        "continual",
        3,
        2,
        True,
        0.9,
        0.5,
    )
    assert json.loads(result.stdout)["steps"] == 3
    # without a recipe: the shared defaults
    assert m3("pretrain", "c.jsonl", "-o", tmp_path / "m", "--init-from", tmp_path).exit_code == 0
    assert (seen["args"].refs_per_chunk, seen["args"].max_overlap, seen["args"].steps) == (5, 0.67, 1000)
    # the old spelling of a preset
    result = m3("pretrain", "c.jsonl", "-o", tmp_path / "m", "--config", "tiny")
    assert result.exit_code == 0 and seen["args"].config == "tiny" and "use --preset tiny" in result.stderr


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('stage = "warmup"\nsteps = [1]\n', "steps"),
        ("nonsense = 3\n", "unknown setting 'nonsense'"),
        ("align-docs = 3\n", "true or false"),
        ("steps = true\n", "a number or a string"),
        ("steps = \n", "not valid TOML"),
    ],
)
def test_a_bad_recipe_is_one_line_naming_the_setting(tmp_path, text, fragment):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    assert_user_error(m3("pretrain", "--config", recipe, "c.jsonl", "-o", tmp_path / "m", "--preset", "tiny"), fragment)
    assert not (tmp_path / "m").exists()
    assert_user_error(m3("pretrain", "--config", tmp_path / "none.toml", "c.jsonl", "-o", tmp_path / "m"), "none.toml")


def test_recipes_name_options_as_the_command_line_does(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("compile = true\njson = true\nbatch_size = 3\nmemory-top-k = 4\n")
    assert read_recipe(recipe, COMMANDS["pretrain"]) == {
        "compile_model": True,
        "as_json": True,
        "batch_size": 3,
        "memory_top_k": 4,
    }


def test_search_takes_the_bank_as_an_option_or_first_word(tmp_path):
    bank = tmp_path / "kb.m3bank"
    bank.write_bytes(b"x")
    assert_usage_error(m3("search", bank), "no query")
    assert_usage_error(m3("search", "a", "b", "c"), "one query")
    assert_usage_error(m3("search", "--bank", bank, bank, "q"), "the bank once")
    assert_user_error(m3("search", bank, "q"), "kb.m3bank")  # the bank is read (and is not one)
    assert_usage_error(m3("synth", tmp_path / "s", "-o", tmp_path / "t"), "output once")


def test_the_cli_reference_is_current():
    from m3cli.cli.reference import reference

    assert (ROOT / "docs" / "cli.md").read_text() == reference(), (
        "docs/cli.md is stale: python -m m3cli.cli.reference > docs/cli.md"
    )
