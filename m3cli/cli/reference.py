"""docs/cli.md, written from the commands themselves (their options, defaults, help and examples),
so that the reference cannot drift from the code: `python -m m3cli.cli.reference > docs/cli.md`
(tests/test_cli.py checks that the file is what this prints)."""

from __future__ import annotations

import inspect as _inspect

from typer.main import get_command

from . import app
from .common import DEPRECATED, DEPRECATED_POSITIONAL, REMOVED_IN, click

# One concept, one option: what it means, in the order the table lists them.
VOCABULARY = [
    ("--model", "the m3 model dir (default: $M3_MODEL, else the model the bank names, else the default model)"),
    ("--bank", "the indexed .m3bank to read (default: $M3_BANK)"),
    ("--output", "what the command writes"),
    (
        "--memories",
        "references read per 64-token chunk (memory), put in front of the prompt (rag), or returned (search)",
    ),
    ("--max-overlap", "the overlap filter (paper Eq. 6): drop references holding more than this share of the text"),
    ("--max-score-gap", "drop references scoring more than this below the chunk's best"),
    ("--max-new-tokens", "tokens generated at most"),
    ("--batch-size", "how many items one batch holds (references, texts, prompts, questions, sequences)"),
    ("--embedder", "the query embedder (an encoder or static embedder dir) of a bank indexed with one"),
    ("--json", "machine-readable output on stdout"),
    ("--device", "auto, cpu, cuda or cuda:N"),
    ("--dtype", "weights' dtype at run time (convert: the dtype stored)"),
    ("--seed", "the random seed"),
    ("--quiet", "no progress bar (bars are drawn only on a terminal anyway)"),
    ("--force", "replace the output"),
]


def _option(cmd: click.Command, name: str) -> click.Option | None:
    for p in cmd.params:
        if isinstance(p, click.Option) and name in p.opts:
            return p
    return None


def _default(p: click.Parameter) -> str:
    if getattr(p, "is_flag", False) and not getattr(p, "secondary_opts", None):
        return "off"
    d = p.default
    if d is None or callable(d):
        return "—"
    return f"`{d}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def reference() -> str:
    group = get_command(app)
    ctx = click.Context(group, info_name="m3")
    commands = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
    out = [
        "# m3 command reference",
        "",
        "Written by `python -m m3cli.cli.reference > docs/cli.md` from the commands themselves; "
        "`m3 COMMAND --help` shows the same. Every example below is run by `tests/test_examples.py`.",
        "",
        "Exit status: 0 success; 1 a failed check or bad input (one line on stderr: `m3: error: …`); "
        "2 a wrong command line (`m3: usage error: …`); 3 a bug in m3 (a traceback, then one line). "
        "stdout carries only data; progress and notes go to stderr.",
        "",
        "## Vocabulary",
        "",
        "One option name and one short flag per concept, in every command that has the concept. "
        "Defaults differ only where the meaning does (noted in the last column).",
        "",
        "| option | short | meaning | commands: default |",
        "|---|---|---|---|",
    ]
    for name, meaning in VOCABULARY:
        uses, shorts = [], set()
        for cname, cmd in commands.items():
            p = _option(cmd, name)
            if p is not None:
                uses.append(f"{cname}: {_default(p)}")
                shorts |= {o for o in p.opts if not o.startswith("--")}
        out.append(
            f"| `{name}` | {' '.join(f'`{s}`' for s in sorted(shorts)) or ''} | {_cell(meaning)} | {'; '.join(uses)} |"
        )
    out += [
        "",
        "The overlap filter keeps every reference (1.0) where the text is the user's own query (search, "
        "generate) and drops those holding more than 2/3 of it where the text is a target the model is scored "
        "or trained on (score, eval, pretrain), as the paper does. `m3 eval` generates 12 tokens by default: "
        "only an answer's first sentence counts.",
        "",
        f"Old names that still work until m3 {REMOVED_IN}, with a note on stderr:",
        "",
        "| command | old | new |",
        "|---|---|---|",
    ]
    for cname, renames in DEPRECATED.items():
        for old, new in renames.items():
            out.append(f"| {cname} | `{old}` | `{new}` |")
    for cname, what in DEPRECATED_POSITIONAL.items():
        out.append(f"| {cname} | `{what}` (positional) | `-o {what}` |")
    out.append("| pretrain | `--config PRESET` | `--preset PRESET` (`--config` now takes a recipe) |")
    for cname, cmd in commands.items():
        out += ["", f"## m3 {cname}", "", _inspect.cleandoc(cmd.help or "").replace("\n\n", "\n\n"), ""]
        args = [p for p in cmd.params if isinstance(p, click.Argument) and not getattr(p, "hidden", False)]
        usage = " ".join([f"m3 {cname}", "[OPTIONS]", *[(p.metavar or p.name or "").upper() for p in args]])
        out += ["```", usage, "```", ""]
        if args:
            out += ["| argument | meaning |", "|---|---|"]
            for p in args:
                out.append(f"| `{(p.metavar or p.name or '').upper()}` | {_cell(getattr(p, 'help', '') or '')} |")
            out.append("")
        out += ["| option | short | default | meaning |", "|---|---|---|---|"]
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden or p.name == "help":
                continue
            longs = [o for o in p.opts if o.startswith("--")] + list(p.secondary_opts)
            shorts = [o for o in p.opts if not o.startswith("--")]
            out.append(
                f"| `{'`/`'.join(longs)}` | {' '.join(f'`{s}`' for s in shorts)} | "
                f"{'required' if p.required else _default(p)} | {_cell(p.help or '')} |"
            )
        examples = [line.strip() for line in (cmd.epilog or "").splitlines()[1:] if line.strip()]
        if examples:
            out += ["", "Examples:", "", "```bash", *examples, "```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
