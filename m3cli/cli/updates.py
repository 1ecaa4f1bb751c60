"""Commands that change a bank in place: add, remove, compact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..default_model import resolve_model
from .common import DeviceOpt, EmbedderOpt, EncodeDtypeOpt, QuietOpt, check_batch, command, echo_json, user_errors

PANEL = "Banks"


@command(
    "add",
    panel=PANEL,
    examples=[
        "m3 add kb.m3bank more.jsonl",
        "m3 add kb.m3bank revised.jsonl --replace --json | jq .replaced_documents",
        "cat new.jsonl | m3 add kb.m3bank -",
    ],
)
@user_errors
def add(
    bank: Annotated[Path, typer.Argument(help="The .m3bank to add to (updated in place, atomically).")],
    corpus: Annotated[
        str, typer.Argument(help="Documents to add: Parquet, JSONL, CSV, text files or a dir, or - for JSONL on stdin.")
    ],
    replace: Annotated[
        bool,
        typer.Option(
            "--replace", help="A document whose id the bank already holds replaces it (without it: an error)."
        ),
    ] = False,
    model: Annotated[
        Optional[Path],
        typer.Option("--model", "-m", help="The bank's model dir (default: $M3_MODEL, else the model the bank names)."),
    ] = None,
    embedder: EmbedderOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="References encoded per forward pass.")] = 16,
    device: DeviceOpt = "auto",
    dtype: EncodeDtypeOpt = "auto",
    max_doc_bytes: Annotated[
        int, typer.Option("--max-doc-bytes", help="Largest record read whole (as for m3 encode).")
    ] = 64 << 20,
    quiet: QuietOpt = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print {bank, segment, added_documents, added_references, replaced_documents, documents, "
            "references, seconds} as JSON.",
        ),
    ] = False,
) -> None:
    """Add documents to a bank without re-encoding it: encoded by the bank's model (and, in an
    indexed bank, embedded by its embedder and indexed), then appended in one atomic switch.

    Costs time for the new documents only. Document ids must be unique: an id the bank holds is
    an error unless --replace. A killed run leaves the bank as it was; run again on a corpus
    file, it continues its encoding. After 24 additions the bank is compacted first (m3 compact).
    """
    from ..bank_update import add_documents

    check_batch(batch_size)
    if max_doc_bytes < 1:
        from ..errors import M3Error

        raise M3Error("--max-doc-bytes must be at least 1")
    summary = add_documents(
        bank,
        corpus,
        resolve_model(model, bank),
        replace=replace,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        show_progress=not quiet,
        max_doc_bytes=max_doc_bytes,
        encoder=embedder,
    )
    if as_json:
        echo_json(summary)
        return
    replaced = f", replacing {summary['replaced_documents']}" if summary["replaced_documents"] else ""
    typer.echo(
        f"added {summary['added_documents']} documents ({summary['added_references']} references{replaced}) to "
        f"{bank}: now {summary['documents']} documents, {summary['references']} references "
        f"({summary['seconds']:.1f} s)"
    )


@command(
    "remove",
    panel=PANEL,
    examples=[
        "m3 remove kb.m3bank --doc d2",
        "m3 remove kb.m3bank --doc d3 --doc d4 --json | jq .removed_references",
    ],
)
@user_errors
def remove(
    bank: Annotated[Path, typer.Argument(help="The .m3bank to remove documents from (updated in place, atomically).")],
    doc: Annotated[
        Optional[list[str]], typer.Option("--doc", "-d", help="Id of a document to remove (repeat for more).")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print {bank, removed_documents, removed_references, documents, references} as JSON.",
        ),
    ] = False,
) -> None:
    """Remove documents from a bank: never retrieved again, at once.

    Their bytes stay in the file until m3 compact. An id the bank does not hold is an error,
    and nothing is removed.
    """
    from ..bank_update import remove_documents

    summary = remove_documents(bank, list(doc or []))
    if as_json:
        echo_json(summary)
        return
    typer.echo(
        f"removed {summary['removed_documents']} documents ({summary['removed_references']} references) from {bank}: "
        f"now {summary['documents']} documents, {summary['references']} references"
    )


@command(
    "compact",
    panel=PANEL,
    examples=["m3 compact kb.m3bank", "m3 compact kb.m3bank --json | jq .bytes_after"],
)
@user_errors
def compact(
    bank: Annotated[Path, typer.Argument(help="The .m3bank to rewrite (a new file renamed into place).")],
    quiet: QuietOpt = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print {bank, compacted, documents, references, bytes_before, bytes_after, seconds} as JSON.",
        ),
    ] = False,
) -> None:
    """Rewrite a bank without its removed documents, its added segments folded into one.

    Memories and embeddings are copied as stored (nothing is re-encoded); the index is rebuilt
    from the stored embeddings with the bank's factory. Reference numbers change.
    """
    from ..bank_update import compact_bank

    summary = compact_bank(bank, show_progress=not quiet)
    if as_json:
        echo_json(summary)
        return
    if not summary["compacted"]:
        typer.echo(f"{bank} has nothing to compact")
        return
    typer.echo(
        f"compacted {bank}: {summary['documents']} documents, {summary['references']} references, "
        f"{summary['bytes_before']:,} -> {summary['bytes_after']:,} bytes"
    )
