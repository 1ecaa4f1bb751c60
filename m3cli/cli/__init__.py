"""The `m3` command line. Each command parses its arguments, calls one library function and
prints; heavy imports live inside the commands so that `m3 --help` is instant.

Commands live with their group: `models` (convert, inspect, score), `banks` (encode, index,
search, distill-embedder), `updates` (add, remove, compact), `answers` (generate, eval, bench), `serving` (serve), `training` (synth, pretrain);
`common` holds the app, the exit codes and the shared option vocabulary.
"""

import os
import sys
from typing import Annotated, Optional

import typer

from .. import __version__
from .common import EXIT_ERROR, app, open_generator, os_error_message  # noqa: F401
from . import models, banks, updates, answers, serving, training  # noqa: F401,E402 — registers the commands, in this order

_open_generator = open_generator  # the name tests and scripts used before the split


def _version(value: bool) -> None:
    if value:
        typer.echo(f"m3 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Memory3 language models with explicit memory: models that read a bank of precomputed
    sparse key-values of your documents while they generate."""


# Commands that only read: once they return, everything they print is flushed and nothing is
# left to write, so the process ends at once instead of spending about a second tearing down
# torch, transformers and FAISS (docs/startup.md).
FAST_EXIT = {"generate", "search", "score", "eval", "inspect", "bench"}


def _quiet_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit


def main() -> None:
    if not sys.stderr.isatty():  # progress bars only on a terminal: libraries' tqdm bars too (GGUF loading)
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        app()
    except BrokenPipeError:  # e.g. `m3 search … | head -1`: the reader is gone, stop quietly
        _quiet_stdout()
        sys.exit(1)
    except SystemExit as e:
        if len(sys.argv) < 2 or sys.argv[1] not in FAST_EXIT or not isinstance(e.code, (int, type(None))):
            raise
        code = e.code or 0
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            _quiet_stdout()
            code = 1
        os._exit(code)
