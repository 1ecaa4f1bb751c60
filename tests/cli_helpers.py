"""Running the CLI in-process and checking how it fails."""

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
