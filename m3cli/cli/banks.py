"""Commands about banks: encode, index, search, distill-embedder."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..default_model import choose_model, model_hint, resolve_bank, resolve_model
from ..errors import M3Error
from ..output import terminal_safe
from .common import (
    click,
    DeviceOpt,
    EncodeDtypeOpt,
    EmbedderOpt,
    MaxGapOpt,
    MaxOverlapOpt,
    QuietOpt,
    MAX_OVERLAP_QUERY,
    MEMORIES,
    check_batch,
    check_gap,
    check_overlap,
    command,
    echo_json,
    output_path,
    read_text_arg,
    user_errors,
)

PANEL = "Banks"
FACTORY_HELP = (
    "FAISS index factory: auto (chosen by the bank's size: Flat up to 100,000 references, then "
    "HNSW32, then IVF-PQ beyond 2 million), Flat, HNSW32, IVF1024,PQ32, PCA128,HNSW32,RFlat, …"
)


@command(
    panel=PANEL,
    examples=[
        "m3 encode corpus.parquet -o kb.m3bank --model models/smollm2",
        "cat docs.jsonl | m3 encode - -o kb-int8.m3bank --codec int8",
        "m3 encode notes/ -o notes.m3bank --json | jq .references",
        "m3 encode corpus.parquet -o kb.m3set && m3 search kb.m3set 'capital of France'",
    ],
)
@user_errors
def encode(
    corpus: Annotated[
        str,
        typer.Argument(
            help="Parquet (column text; optional id, title, source), JSONL with the "
            "same fields, or - for JSONL on standard input."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="The .m3bank file to write, or a DIR.m3set bank set (one shard per process, and a manifest).",
        ),
    ],
    model: Annotated[
        Optional[Path],
        typer.Option(
            "--model",
            "-m",
            help="m3 model dir that encodes the memories, "
            "or default; without it $M3_MODEL, else the default model. The "
            "bank records which, so later commands find it.",
        ),
    ] = None,
    codec: Annotated[
        str,
        typer.Option(
            help="KV codec: bf16 (exact), int8 (per-vector scale) or vq (product "
            "quantization trained on the bank's own vectors)."
        ),
    ] = "bf16",
    vq_subquantizers: Annotated[
        Optional[int],
        typer.Option(
            "--vq-subquantizers", help="vq: bytes per vector (sub-spaces of the head dim); default head_dim/4."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="References encoded per forward pass.")] = 16,
    device: DeviceOpt = "auto",
    dtype: EncodeDtypeOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT (and discard an interrupted run).")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run of the same command from its last checkpoint.")
    ] = False,
    index: Annotated[
        str,
        typer.Option(
            help="Also build this FAISS retrieval index (see `m3 index`: auto picks "
            "one by the bank's size); 'none' to skip."
        ),
    ] = "auto",
    embedder: Annotated[str, typer.Option(help="Embedder for the index: minilm, self, or an encoder dir.")] = "minilm",
    max_doc_bytes: Annotated[
        int,
        typer.Option(
            "--max-doc-bytes",
            help="Largest record read whole (a JSONL "
            "line, CSV field, Parquet row, text on stdin); text files of "
            "any size stream.",
        ),
    ] = 64 << 20,
    quiet: QuietOpt = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print {output, documents, references, tokens, codec, fingerprint, index} as JSON."
        ),
    ] = False,
) -> None:
    """Encode a corpus into an .m3bank of sparse explicit memories (and index it for retrieval).

    Documents are cut into references of at most 128 tokens at sentence boundaries; each
    reference's memory is computed by the model and written with its text. The output path never
    holds a half-written bank; a killed run continues with --resume and gives the same bytes.
    """
    hint = model_hint(choose_model(model)[0])
    model = resolve_model(model)
    from ..bank import CODECS

    if codec not in CODECS:
        raise M3Error(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if max_doc_bytes < 1:
        raise M3Error("--max-doc-bytes must be at least 1")
    if index.lower() not in ("none", "auto"):  # an invalid factory fails before hours of encoding
        from ..retrieval import empty_index

        empty_index(8 if "PQ" not in index else 64, index)
    from ..atomic import output_lock

    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    with output_lock(output) if single else contextlib.nullcontext():  # one writer: encode and index alike
        from ..encoding import encode_corpus

        try:
            summary = encode_corpus(
                corpus,
                model,
                output,
                codec=codec,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                overwrite=force,
                resume=resume,
                show_progress=not quiet,
                vq_subquantizers=vq_subquantizers,
                model_hint=hint,
                max_doc_bytes=max_doc_bytes,
            )
        except KeyboardInterrupt:
            typer.echo(
                "m3: interrupted; run the same command with --resume to continue from the last checkpoint", err=True
            )
            raise typer.Exit(130)
        if summary is None:  # the non-main processes of a sharded encode
            return
        report = summary.to_json()
        if not as_json:
            typer.echo(
                f"wrote {summary.path}: {summary.documents} documents, {summary.references} references, "
                f"{summary.tokens} tokens, codec {summary.codec}, model {summary.fingerprint[:19]}"
            )
        if index.lower() != "none":
            from ..device import resolve_device
            from ..embed import load_embedder
            from ..retrieval import index_bank

            try:
                emb = load_embedder(embedder, model_dir=model, device=resolve_device(device))
                info = index_bank(output, emb, factory=index, show_progress=not quiet)
            except M3Error as e:
                raise M3Error(
                    f"{e} (the bank was written without an index: run `m3 index {output}` to add one)"
                ) from None
            report["index"] = {k: info[k] for k in ("factory", "embedder", "dim")}
            if not as_json:
                typer.echo(
                    f"indexed {output}: {info['factory']} over {info['embedder']} embeddings (dim {info['dim']})"
                )
        if as_json:
            echo_json(report)


@command(
    "index",
    panel=PANEL,
    examples=[
        "m3 index kb.m3bank",
        "m3 index kb.m3bank --factory HNSW32 --ef-search 128",
        "m3 index kb.m3bank --factory IVF4,Flat --nprobe 2 --json | jq .factory",
        "m3 index kb.m3bank --embedder self --model models/smollm2",
    ],
)
@user_errors
def index_cmd(
    bank: Annotated[
        Path,
        typer.Argument(
            help="The .m3bank to index (updated in place; rewritten whole only "
            "when replaced indexes would make up a quarter of it)."
        ),
    ],
    embedder: Annotated[
        str,
        typer.Option(
            help="minilm (default, offline), self (the bank's model: needs "
            "--model), a local Hugging Face encoder dir, or a static "
            "embedder dir (m3 distill-embedder)."
        ),
    ] = "minilm",
    pooling: Annotated[str, typer.Option(help="Pooling for an encoder dir: mean or cls.")] = "mean",
    model: Annotated[
        Optional[Path],
        typer.Option("--model", "-m", help="Model dir, for --embedder self (default: the model the bank names)."),
    ] = None,
    factory: Annotated[str, typer.Option(help=FACTORY_HELP)] = "auto",
    nprobe: Annotated[int, typer.Option(help="IVF lists searched per query (stored in the bank).")] = 16,
    ef_search: Annotated[int, typer.Option("--ef-search", help="HNSW search depth (stored in the bank).")] = 64,
    ef_construction: Annotated[
        Optional[int],
        typer.Option(
            "--ef-construction",
            help="HNSW graph-building depth "
            "(default: FAISS's 40; higher: more recall at the same "
            "--ef-search, slower to build).",
        ),
    ] = None,
    k_factor: Annotated[
        Optional[int],
        typer.Option(
            "--k-factor",
            help="For a factory ending in ,RFlat: "
            "candidates per result re-ranked with the exact vectors "
            "(default: FAISS's 1; e.g. 8 with PCA128,HNSW32,RFlat).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts embedded per batch.")] = 64,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {references, factory, embedder, dim, embedded, index_bytes} as JSON.")
    ] = False,
) -> None:
    """Embed a bank's references (if needed) and store a FAISS retrieval index in it.

    Embeddings already in the bank from the same embedder are reused, so rebuilding the index
    with another factory is quick. Reference ids survive rebuilds: FAISS rows map to references
    explicitly. Interrupted embedding resumes when the command is run again.
    """
    from ..bank import Bank, require_same_model
    from ..device import resolve_device
    from ..embed import load_embedder
    from ..retrieval import index_bank

    check_batch(batch_size)
    Bank(bank).close()  # a clear error for a bad bank before loading any model
    if embedder == "self":  # the bank's own model embeds: the one it names, unless told otherwise
        from ..checkpoint import model_fingerprint

        model = resolve_model(model, bank)
        with Bank(bank) as b:
            require_same_model(b, model_fingerprint(model))
    emb = load_embedder(embedder, model_dir=model, pooling=pooling, device=resolve_device(device))
    info = index_bank(
        bank,
        emb,
        factory=factory,
        batch_size=batch_size,
        show_progress=not quiet,
        nprobe=nprobe,
        ef_search=ef_search,
        ef_construction=ef_construction,
        k_factor=k_factor,
    )
    if as_json:
        echo_json(info)
        return
    typer.echo(
        f"indexed {bank}: {info['references']} references, {info['factory']} over {info['embedder']} "
        f"embeddings (dim {info['dim']}{', computed' if info['embedded'] else ', reused'}), "
        f"index {info['index_bytes']:,} B"
    )


@command(
    "distill-embedder",
    panel=PANEL,
    examples=[
        "m3 distill-embedder -o models/kb-static --idf-corpus corpus.parquet",
        "m3 index kb.m3bank --embedder models/kb-static",
        'm3 generate --bank kb.m3bank --embedder models/kb-static "Who founded Northwind?"',
    ],
)
@user_errors
def distill_embedder(
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", help="Directory to write (m3-embedder.json, static.safetensors, tokenizer.json)."
        ),
    ] = None,
    old_out_dir: Annotated[Optional[Path], typer.Argument(hidden=True, metavar="[OUT_DIR]")] = None,
    source: Annotated[
        str, typer.Option("--from", help="The teacher: minilm (default, offline) or a local Hugging Face encoder dir.")
    ] = "minilm",
    pooling: Annotated[str, typer.Option(help="The teacher's pooling, for an encoder dir: mean or cls.")] = "mean",
    dims: Annotated[
        Optional[int],
        typer.Option(
            help="Dimensions kept by PCA (at most the teacher's; default 256, or the teacher's width if smaller)."
        ),
    ] = None,
    sif: Annotated[
        float,
        typer.Option(
            help="SIF weight a: a token of estimated frequency p is scaled by a / (a + p) (without --idf-corpus)."
        ),
    ] = 1e-4,
    idf_corpus: Annotated[
        Optional[Path],
        typer.Option(
            "--idf-corpus",
            help="Weigh tokens by their inverse "
            "document frequency in this corpus (Parquet or JSONL, as "
            "for m3 encode; e.g. the knowledge base) instead of by "
            "Zipf rank: much better at names.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Vocabulary tokens per teacher call.")] = 1024,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if m3 wrote it.")] = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Distill a static query embedder from a sentence encoder (Model2Vec's method).

    Every vocabulary token goes through the encoder once; PCA and token weights follow (Zipf-
    estimated SIF weights, or with --idf-corpus the tokens' inverse document frequency in that
    corpus). The result embeds a text as the mean of its tokens' vectors: about a hundred times
    cheaper than MiniLM on a CPU, for some loss of retrieval quality (docs/retrieval.md). Index
    a bank with it (`m3 index --embedder DIR`) and pass the same DIR to commands that query it.
    """
    from ..device import resolve_device
    from ..embed import HFEncoder, distill_static, load_embedder

    out_dir = output_path(output, old_out_dir, "distill-embedder")
    check_batch(batch_size)
    if source == "self":
        raise M3Error("--from self: the teacher must be minilm or a Hugging Face encoder dir")
    teacher = load_embedder(source, pooling=pooling, device=resolve_device(device))
    if not isinstance(teacher, HFEncoder):
        raise M3Error(f"--from {source}: the teacher must be minilm or a Hugging Face encoder dir")
    texts = None
    if idf_corpus is not None:
        from ..corpus import read_corpus

        texts = (doc.text for doc in read_corpus(idf_corpus))
    info = distill_static(
        teacher,
        out_dir,
        dims=dims,
        sif=sif,
        batch_size=batch_size,
        overwrite=force,
        show_progress=not quiet,
        idf_texts=texts,
        idf_source=str(idf_corpus or ""),
    )
    if as_json:
        echo_json({"output": str(out_dir), **info})
        return
    weights = (
        f"IDF weights from {info['idf_documents']} documents"
        if info["weights"] == "idf"
        else f"SIF weights (a = {info['sif']:g})"
    )
    typer.echo(
        f"wrote {out_dir}: {info['vocab_size']} token vectors of dim {info['dim']}, distilled from "
        f"{info['teacher']}, {weights}"
    )


@command(
    panel=PANEL,
    examples=[
        'm3 search --bank kb.m3bank "Who founded the Northwind Institute?"',
        "cat questions.txt | m3 search --bank kb.m3bank - --memories 3 --json | jq .results[0].ref",
        'm3 search kb.m3bank "capital of France" --max-score-gap 0.1',
    ],
)
@user_errors
def search(
    words: Annotated[
        list[str],
        typer.Argument(
            help="QUERY, or BANK QUERY: the query, or - to read one query per "
            "line from standard input; a bank given first is used like "
            "--bank.",
            metavar="[BANK] QUERY",
        ),
    ],
    bank: Annotated[
        Optional[Path], typer.Option("--bank", "-b", help="An indexed .m3bank (default: $M3_BANK).")
    ] = None,
    memories: Annotated[int, typer.Option("--memories", help="References per query.")] = MEMORIES,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per query (JSON lines).")] = False,
    max_overlap: MaxOverlapOpt = MAX_OVERLAP_QUERY,
    max_gap: MaxGapOpt = None,
    model: Annotated[
        Optional[Path],
        typer.Option(
            "--model",
            "-m",
            help="Model dir, for banks indexed with the `self` embedder (default: the model the bank names).",
        ),
    ] = None,
    embedder: EmbedderOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """The references of a bank that a query retrieves, best first, with scores and text."""
    from ..bank import Bank
    from ..device import resolve_device
    from ..retrieval import Retriever, query_embedder

    if len(words) > 2:
        raise click.UsageError("give one query (quote it) and at most one bank: m3 search [BANK] QUERY")
    if len(words) == 2:
        if bank is not None:
            raise click.UsageError("give the bank once: m3 search --bank BANK QUERY")
        bank = Path(words[0])
    elif (words[0].endswith(".m3bank") and Path(words[0]).is_file()) or (Path(words[0]) / "manifest.json").is_file():
        raise click.UsageError(f"no query: m3 search {words[0]} QUERY (or - for queries on standard input)")
    query = words[-1]
    bank = resolve_bank(bank)
    if bank is None:
        raise M3Error("no bank: give --bank BANK (or set $M3_BANK)")
    if memories < 1:
        raise M3Error("--memories must be at least 1")
    check_gap(max_gap)
    check_overlap(max_overlap)
    queries = [query] if query != "-" else [q for q in read_text_arg("-").splitlines() if q.strip()]
    if not queries:
        raise M3Error("no query on standard input")
    with Bank(bank) as b:
        if b.header.get("m3.embed.name") == "self":  # queries go through the bank's own model
            model = resolve_model(model, bank)
        emb = query_embedder(b, model_dir=model, encoder=embedder, device=resolve_device(device))
        results = Retriever(b, emb).search(queries, k=memories, max_overlap=max_overlap, max_gap=max_gap)
        for q, hits in zip(queries, results):
            if as_json:
                typer.echo(json.dumps({"query": q, "results": [h.__dict__ for h in hits]}, ensure_ascii=False))
                continue
            if len(queries) > 1:
                typer.echo(f"# {terminal_safe(q)}")
            for h in hits:
                text = " ".join(h.text.split())
                typer.echo(
                    f"{h.score:7.4f}  ref {h.ref:<6} {terminal_safe(h.title or h.doc_id)}: "
                    f"{terminal_safe(text[:160])}{'…' if len(text) > 160 else ''}"
                )
