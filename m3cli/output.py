"""Printing for people: terminal-safe text (file contents cannot drive the terminal) and
aligned key/value listings."""

import typer


def terminal_safe(text: str) -> str:
    """Escape control characters (except newline and tab) so file contents cannot drive the terminal."""
    return "".join(c if c in "\n\t" or (c.isprintable() and c not in "\x1b") else repr(c)[1:-1] for c in text)


def print_fields(info: dict) -> None:
    """key  value lines, aligned; large integers with thousands separators."""
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        typer.echo(f"{key:<{width}}  {terminal_safe(str(value))}")


def stderr_progress(label: str, enabled: bool = True):
    """A progress bar on standard error, drawn only when that is a terminal (never into a pipe or
    a log file). Use as a context manager; add tasks with `.add_task(description, total=…)`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn(label),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
    )
