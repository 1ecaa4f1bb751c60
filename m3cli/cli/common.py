"""What every command shares: the app, how it fails, and the option vocabulary.

Exit codes: 0 success; 1 a failed check or bad input (`m3: error: …`, one line); 2 a wrong
command line (`m3: usage error: …`, one line); 3 a bug in m3 (traceback, then one line).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ..errors import M3Error
from ..output import terminal_safe

try:  # typer >= 0.26 carries its own copy of click, whose classes and exceptions its commands use
    from typer._click import core as _core, exceptions as _exceptions, globals as _globals
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import core as _core, exceptions as _exceptions, globals as _globals  # type: ignore[no-redef]


class _NoSuchError(Exception):
    """Stands in for an exception class an older click does not have (nothing raises it)."""


# the parts of click m3 uses, from whichever copy typer runs on
click = SimpleNamespace(
    Command=_core.Command,
    Context=_core.Context,
    Parameter=_core.Parameter,
    Option=TyperOption,
    Argument=TyperArgument,
    UsageError=_exceptions.UsageError,
    BadParameter=_exceptions.BadParameter,
    ClickException=_exceptions.ClickException,
    NoArgsIsHelpError=getattr(_exceptions, "NoArgsIsHelpError", _NoSuchError),  # click < 8.2 has none
    Abort=typer.Abort,
    get_current_context=_globals.get_current_context,
)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

# Old option names that keep working for one release, with a note on stderr (docs/cli.md).
DEPRECATED: dict[str, dict[str, str]] = {
    "search": {"-k": "--memories"},
    "pretrain": {"--refs-per-chunk": "--memories"},
    "bench": {"--new-tokens": "--max-new-tokens", "--batch": "--batch-size"},
}
DEPRECATED_POSITIONAL = {"synth": "OUT_DIR", "distill-embedder": "OUT_DIR"}  # now -o/--output
REMOVED_IN = "0.3"


def _one_line(message: str) -> str:
    return " ".join(terminal_safe(str(message)).split())


def warn(message: str) -> None:
    typer.echo(f"m3: warning: {_one_line(message)}", err=True)


def _command_path(ctx: click.Context | None) -> str:
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["m3", *reversed(names)])


class M3Command(TyperCommand):
    """A command that still understands the old names in DEPRECATED, saying so on stderr."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        renames = DEPRECATED.get(self.name or "", {})
        if renames:
            out = []
            for i, arg in enumerate(args):
                if arg == "--":
                    out += args[i:]
                    break
                name, eq, value = arg.partition("=")
                if name not in renames and len(arg) > 2 and arg[:2] in renames and arg[1] != "-":
                    name, eq, value = arg[:2], "=", arg[2:]  # -k3
                if name in renames:
                    warn(f"{name} is deprecated; use {renames[name]} (the old name goes in m3 {REMOVED_IN})")
                    arg = renames[name] + eq + value
                out.append(arg)
            args = out
        return super().parse_args(ctx, args)


class M3Group(TyperGroup):
    """The `m3` group: usage errors and internal errors end in one line with their own exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except M3Error as e:  # raised while the command line was read (e.g. a recipe that is not valid)
            typer.echo(f"m3: error: {_one_line(str(e))}", err=True)
            sys.exit(EXIT_ERROR)
        except click.NoArgsIsHelpError as e:
            typer.echo(e.ctx.get_help() if e.ctx is not None else str(e))
            sys.exit(EXIT_USAGE)
        except click.UsageError as e:
            path = _command_path(e.ctx)
            typer.echo(f"m3: usage error: {_one_line(e.format_message())} (see {path} --help)", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as e:
            typer.echo(f"m3: error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            typer.echo("m3: aborted", err=True)
            sys.exit(EXIT_ERROR)
        except (BrokenPipeError, KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 — a bug: keep the traceback for the report
            traceback.print_exc()
            typer.echo("m3: internal error (a bug in m3): please report it with the traceback above", err=True)
            sys.exit(EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="m3",
    cls=M3Group,
    help="Memory3 language models with explicit memory: models that read a bank of precomputed "
    "sparse key-values of your documents while they generate.",
    epilog="Examples:\n\n  m3 encode corpus.parquet -o kb.m3bank\n\n"
    '  m3 generate --bank kb.m3bank "Where was Ilsa Varenkov born?"\n\n  m3 inspect kb.m3bank\n\n'
    "Exit status: 0 success, 1 a failed check or bad input, 2 a wrong command line, 3 a bug in m3.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(name: str | None = None, *, examples: list[str], panel: str, **kw):
    """Register a command with its --help examples (each one is run by tests/test_examples.py)."""
    epilog = "Examples:\n\n" + "\n\n".join(f"  {e}" for e in examples)
    return app.command(name, cls=M3Command, epilog=epilog, rich_help_panel=panel, **kw)


def fail(message: str) -> None:
    typer.echo(f"m3: error: {_one_line(message)}", err=True)
    raise typer.Exit(EXIT_ERROR)


def os_error_message(e: OSError) -> str:
    """One line for an error of the file system, naming the file and what to do."""
    import errno

    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "free some space and run it again (outputs are written whole or not at all)",
        errno.EDQUOT: "free some space and run it again (outputs are written whole or not at all)",
        errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
        errno.EROFS: "the file system is read-only; write somewhere else",
        errno.EACCES: "no permission; write somewhere else or change the permissions",
        errno.EPERM: "not permitted (an immutable or protected file?)",
    }.get(e.errno or 0)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def user_errors(fn):
    """Turn M3Error/ConfigError and file-system errors into one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..config import ConfigError

        try:
            return fn(*args, **kwargs)
        except (M3Error, ConfigError) as e:
            fail(str(e))
        except BrokenPipeError:
            raise
        except OSError as e:  # the disk, not m3: full, read-only, no permission, file too large
            fail(os_error_message(e))
        except KeyboardInterrupt:
            typer.echo("m3: interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def read_text_arg(text: str) -> str:
    if text != "-":
        return text
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise M3Error("standard input is not valid UTF-8") from None


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, default=str))


def check_gap(max_gap: float | None) -> None:
    """Before any model or bank loads."""
    from ..retrieval import check_max_gap

    check_max_gap(max_gap)


def check_overlap(max_overlap: float) -> None:
    if not 0.0 <= max_overlap <= 1.0:
        raise M3Error("--max-overlap must be in [0, 1] (1 keeps every reference)")


def check_batch(batch_size: int) -> None:
    from ..errors import MAX_BATCH

    if not 1 <= batch_size <= MAX_BATCH:
        raise M3Error(f"--batch-size must be in 1..{MAX_BATCH}")


def output_path(output: Optional[Path], old_positional: Optional[Path], command: str) -> Path:
    """-o/--output, or the positional OUT_DIR of earlier releases (with a note)."""
    if old_positional is not None:
        if output is not None:
            raise click.UsageError("give the output once: -o OUT_DIR")
        warn(f"m3 {command} OUT_DIR is deprecated; use m3 {command} -o OUT_DIR (the old form goes in m3 {REMOVED_IN})")
        return old_positional
    if output is None:
        raise click.UsageError("Missing option '--output' / '-o'.")
    return output


# --- the vocabulary: one name, one short flag, one default for each concept (docs/cli.md) -------
MODEL_HELP = (
    "m3 model dir, or default. Without it: $M3_MODEL, else the model the bank names, else the "
    "default model (SmolLM2-135M-Instruct with the memory reader m3 ships, made once; see m3 inspect)."
)
BANK_HELP = "An indexed .m3bank (default: $M3_BANK)."
MEMORIES = 5
# The overlap filter (paper Eq. 6) guards against leaks: where the text is a target the model is
# scored or trained on (score, eval, pretrain), references holding more than 2/3 of it are dropped,
# as the paper does; where the text is the user's own query (search, generate) nothing leaks and
# every reference stays (1.0), so a pasted sentence finds its own document.
MAX_OVERLAP = 0.67
MAX_OVERLAP_QUERY = 1.0
MAX_NEW_TOKENS = 128

ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help=MODEL_HELP)]
BankOpt = Annotated[Optional[Path], typer.Option("--bank", "-b", help=BANK_HELP)]
MemoriesOpt = Annotated[
    int,
    typer.Option(
        "--memories", help="References read per 64-token chunk (memory), or put in front of the prompt (rag)."
    ),
]
MaxOverlapOpt = Annotated[
    float,
    typer.Option(
        "--max-overlap",
        help="Drop references whose overlap with the query "
        "text exceeds this (paper Eq. 6: the share of "
        "the reference's words found, in order, in the "
        "text); 1 keeps all.",
    ),
]
MaxGapOpt = Annotated[
    Optional[float],
    typer.Option(
        "--max-score-gap",
        help="Drop references scoring more than this "
        "below the chunk's best (a clear winner "
        "is read alone); default: keep all.",
    ),
]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")]
EmbedderOpt = Annotated[
    Optional[str], typer.Option("--embedder", help="Encoder or static embedder dir, for banks indexed with one.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto (bf16 on CUDA, fp32 on CPU), float32 (fp32) or bfloat16 (bf16). On a CPU with native "
        "bfloat16 (`m3 inspect`: cpu_bf16 True) bf16 generates 1.6-2.4x as fast on long outputs, rounded "
        "differently.",
    ),
]
EncodeDtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto (bf16 on CUDA, fp32 on CPU), float32 (fp32) or bfloat16 (bf16): what the model encodes "
        "in (memories differ slightly between them).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@contextlib.contextmanager
def open_generator(
    model: Path, bank: Optional[Path], device: str, dtype: str, embedder: Optional[str], cache_size: int = 4096
):
    """Load the model (and the bank with its retriever, checking the bank belongs to the model);
    yield (Generator, tokenizer). The CLI's way into m3cli.api."""
    from ..api import Bank, Model

    opened = Bank.open(bank, embedder=embedder, device=device) if bank is not None else None
    try:
        loaded = Model.load(model, bank=opened, device=device, dtype=dtype)  # the bank is checked first
        yield loaded.generator(opened, cache_size=cache_size), loaded.tokenizer
    finally:
        if opened is not None:
            opened.close()
