"""The `m3` command line. Each command parses its arguments, calls one library function and
prints; heavy imports live inside the commands so that `m3 --help` is instant.

User mistakes raise M3Error and end as one line on stderr with exit status 1.
"""

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import MAX_BATCH, M3Error
from .default_model import choose_model, model_hint, resolve_bank, resolve_model
from .output import print_fields, terminal_safe

app = typer.Typer(
    name="m3",
    help="Memory3 language models with explicit memory: convert, score, encode, index, search, inspect, "
         "generate, bench, synth, pretrain, eval.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_ERROR = 1
MODEL_HELP = ("m3 model dir, or default. Without it: $M3_MODEL, else the model the bank names, else the "
              "default model (SmolLM2-135M-Instruct with the memory reader m3 ships, made once; see m3 inspect).")
BANK_HELP = "An indexed .m3bank (default: $M3_BANK)."


def _fail(message: str) -> None:
    one_line = " ".join(terminal_safe(str(message)).split())
    typer.echo(f"m3: error: {one_line}", err=True)
    raise typer.Exit(EXIT_ERROR)


def os_error_message(e: OSError) -> str:
    """One line for an error of the file system, naming the file and what to do."""
    import errno

    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    hint = {errno.ENOSPC: "free some space and run it again (outputs are written whole or not at all)",
            errno.EDQUOT: "free some space and run it again (outputs are written whole or not at all)",
            errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
            errno.EROFS: "the file system is read-only; write somewhere else",
            errno.EACCES: "no permission; write somewhere else or change the permissions",
            errno.EPERM: "not permitted (an immutable or protected file?)"}.get(e.errno)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def user_errors(fn):
    """Turn M3Error/ConfigError into a one-line message and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import ConfigError

        try:
            return fn(*args, **kwargs)
        except (M3Error, ConfigError) as e:
            _fail(str(e))
        except BrokenPipeError:
            raise
        except OSError as e:  # the disk, not m3: full, read-only, no permission, file too large
            _fail(os_error_message(e))
        except KeyboardInterrupt:
            typer.echo("m3: interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _read_text_arg(text: str) -> str:
    if text != "-":
        return text
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise M3Error("standard input is not valid UTF-8") from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"m3 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None) -> None:
    """Memory3 language models with explicit memory."""


@app.command(epilog="Examples:\n\n  m3 convert ./SmolLM2-135M-Instruct -o models/smollm2\n\n"
                    "  m3 convert model.Q4_1.gguf -o models/smollm2 --dtype bfloat16")
@user_errors
def convert(
    src: Annotated[Path, typer.Argument(help="Hugging Face checkpoint dir (Llama, Qwen2, Mistral, SmolLM), "
                                             "a GGUF file, or a dir holding one GGUF file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The m3 model dir to create.")],
    dtype: Annotated[str, typer.Option(help="Weight dtype to store: auto (as the source), float32, bfloat16, "
                                            "float16.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Import a local Hugging Face or GGUF checkpoint into an m3 model dir (safetensors, no pickle)."""
    from .checkpoint import config_summary
    from .convert import convert as run

    cfg = run(src, output, dtype=dtype, overwrite=force)
    info = config_summary(cfg)
    typer.echo(f"wrote {output}: {cfg.n_layers} layers, {info['parameters']:,} parameters, "
               f"memory layers {list(cfg.mem_layers)}, reference prefix ids {list(cfg.reference_prefix_ids)}")


@app.command(epilog="Examples:\n\n  m3 score --model models/smollm2 \"The capital of France is Paris.\"\n\n"
                    "  cat doc.txt | m3 score --model models/smollm2 --json - | jq .perplexity\n\n"
                    "  m3 score --model models/smollm2 --bank kb.m3bank --mode memory \"Paris is the capital of France.\"")
@user_errors
def score(
    text: Annotated[str, typer.Argument(help="The text to score, or - to read it from standard input.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    bank: Annotated[Optional[Path], typer.Option("--bank", "-b", help=BANK_HELP + " For --mode memory or "
                                                 "rag.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="none (closed book), memory (each 64-token chunk reads "
                                                     "its own memories) or rag (references in front); "
                                                     "default: memory with --bank, else none.")] = None,
    memories: Annotated[int, typer.Option(help="References per chunk (memory) or in front (rag).")] = 5,
    max_overlap: Annotated[Optional[float], typer.Option("--max-overlap", help="Drop references whose overlap "
                                                          "with the query text (Eq. 6) exceeds this.")] = None,
    max_gap: Annotated[Optional[float], typer.Option("--max-score-gap", help="Drop references scoring more than "
                                                      "this below the chunk's best (retriever confidence: a clear "
                                                      "winner is read alone); default: keep all.")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="Encoder or static embedder dir, for banks indexed with one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {token_ids, logprobs, perplexity, mode, chunks} "
                                                         "as JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16.")] = "auto",
) -> None:
    """Per-token log-probabilities and perplexity of a text, closed book or with memory.

    logprobs[i] is log p(token_ids[i+1] | token_ids[:i+1]); every mode scores the same tokens,
    so perplexities compare across modes.
    """
    bank = resolve_bank(bank)
    from .score import score_text

    _check_gap(max_gap)
    mode = mode or ("memory" if bank is not None else "none")
    body = _read_text_arg(text)
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise M3Error("the text is not valid UTF-8") from None
    model = resolve_model(model, bank)
    if mode == "none" and bank is None:
        from .checkpoint import load_model_dir, load_tokenizer, read_config
        from .device import resolve_device, resolve_dtype

        read_config(model)
        tokenizer = load_tokenizer(model)
        dev = resolve_device(device)
        net = load_model_dir(model, dev, resolve_dtype(dev, dtype))
        result = {**score_text(net, tokenizer, body), "mode": "none", "chunks": []}
    else:
        from .generate import Options

        with _open_generator(model, bank, device, dtype, embedder) as (gen, tokenizer):
            result = gen.score(body, Options(mode=mode, memories=memories, max_overlap=max_overlap, max_gap=max_gap))
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    for tid, lp in zip(result["token_ids"][1:], result["logprobs"]):
        typer.echo(f"{lp:10.4f}  {terminal_safe(repr(tokenizer.decode([tid])))}")
    typer.echo(f"perplexity {result['perplexity']:.4f} over {len(result['logprobs'])} tokens (mode {result['mode']})")


@app.command(epilog="Examples:\n\n  m3 encode samples/corpus.jsonl -o kb.m3bank --model out/smollm2\n\n"
                    "  cat docs.jsonl | m3 encode - -o kb.m3bank --model out/smollm2 --codec int8")
@user_errors
def encode(
    corpus: Annotated[str, typer.Argument(help="Parquet (column text; optional id, title, source), JSONL with the "
                                               "same fields, or - for JSONL on standard input.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .m3bank file to write.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="m3 model dir that encodes the memories, "
                                                  "or default; without it $M3_MODEL, else the default model. The "
                                                  "bank records which, so later commands find it.")] = None,
    codec: Annotated[str, typer.Option(help="KV codec: bf16 (exact), int8 (per-vector scale) or vq (product "
                                            "quantization trained on the bank's own vectors).")] = "bf16",
    vq_subquantizers: Annotated[Optional[int], typer.Option("--vq-subquantizers", help="vq: bytes per vector "
                                                            "(sub-spaces of the head dim); default head_dim/4.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="References encoded per forward pass.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT (and discard an interrupted run).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command "
                                                          "from its last checkpoint.")] = False,
    index: Annotated[str, typer.Option(help="Also build this FAISS retrieval index (see `m3 index`); "
                                            "'none' to skip.")] = "Flat",
    embedder: Annotated[str, typer.Option(help="Embedder for the index: minilm, self, or an encoder dir.")] = "minilm",
    max_doc_bytes: Annotated[int, typer.Option("--max-doc-bytes", help="Largest record read whole (a JSONL "
                                               "line, CSV field, Parquet row, text on stdin); text files of "
                                               "any size stream.")] = 64 << 20,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Encode a corpus into an .m3bank of sparse explicit memories (and index it for retrieval).

    Documents are cut into references of at most 128 tokens at sentence boundaries; each
    reference's memory is computed by the model and written with its text. The output path never
    holds a half-written bank; a killed run continues with --resume and gives the same bytes.
    """
    hint = model_hint(choose_model(model)[0])
    model = resolve_model(model)
    from .bank import CODECS

    if codec not in CODECS:
        raise M3Error(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if max_doc_bytes < 1:
        raise M3Error("--max-doc-bytes must be at least 1")
    if index.lower() != "none":  # an invalid factory fails before hours of encoding
        from .retrieval import empty_index

        empty_index(8 if "PQ" not in index else 64, index)
    from .atomic import output_lock

    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    with output_lock(output) if single else contextlib.nullcontext():  # one writer: encode and index alike
        from .encode import encode_corpus

        try:
            summary = encode_corpus(corpus, model, output, codec=codec, batch_size=batch_size, device=device,
                                    dtype=dtype, overwrite=force, resume=resume, show_progress=not quiet,
                                    vq_subquantizers=vq_subquantizers, model_hint=hint, max_doc_bytes=max_doc_bytes)
        except KeyboardInterrupt:
            typer.echo("m3: interrupted; run the same command with --resume to continue from the last checkpoint",
                       err=True)
            raise typer.Exit(130)
        if summary is None:  # the non-main processes of a sharded encode
            return
        typer.echo(f"wrote {summary.path}: {summary.documents} documents, {summary.references} references, "
                   f"{summary.tokens} tokens, codec {summary.codec}, model {summary.fingerprint[:19]}")
        if index.lower() != "none":
            from .device import resolve_device
            from .embed import load_embedder
            from .retrieval import index_bank

            try:
                emb = load_embedder(embedder, model_dir=model, device=resolve_device(device))
                info = index_bank(output, emb, factory=index, show_progress=not quiet)
            except M3Error as e:
                raise M3Error(f"{e} (the bank was written without an index: run `m3 index {output}` to add one)") from None
            typer.echo(f"indexed {output}: {info['factory']} over {info['embedder']} embeddings (dim {info['dim']})")


@app.command(epilog="Examples:\n\n  m3 inspect\n\n  m3 inspect --json | jq -r .default_model\n\n  m3 inspect memory3-2.4b\n\n  m3 inspect models/smollm2 --json | jq .memory_bytes_bf16\n\n"
                    "  m3 inspect kb.m3bank --verify\n\n  m3 inspect kb.m3bank --ref 3 --model out/smollm2")
@user_errors
def inspect(
    target: Annotated[Optional[str], typer.Argument(help="An .m3bank file, an m3 model dir, or a preset name "
                                                         "(memory3-2.4b, small, mini, tiny); none: the "
                                                         "environment (default model, cache, device, versions).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ref: Annotated[Optional[int], typer.Option("--ref", help="Bank: show reference N and the tokens kept "
                                                             "per memory layer and KV head.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Bank --ref: model dir whose tokenizer "
                                                                        "turns kept positions into token strings; "
                                                                        "--verify: the model to check the bank "
                                                                        "against (default: $M3_MODEL, else the "
                                                                        "model the bank names, if it is "
                                                                        "here).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Bank: recompute every checksum, check every record and "
                                                          "value, load the index, and check the bank fits its "
                                                          "model; exit 1 on any problem.")] = False,
) -> None:
    """Describe a bank (counts, model, embedder, index, sections), a model (parameters, memory
    geometry), or with no target what commands fall back on: the model, bank and embedder they
    use without flags, the cache dir, the device and versions."""
    from .checkpoint import config_summary, read_config
    from .config import PRESETS

    if target is None:
        if ref is not None or verify or model is not None:
            raise M3Error("--ref, --verify and --model need a bank: m3 inspect BANK …")
        from .default_model import environment

        info = environment()
        if as_json:
            typer.echo(json.dumps(info))
            return
        versions = info.pop("versions")
        print_fields({**info, "versions": " ".join(f"{k} {v}" for k, v in versions.items())})
        return
    path = Path(target)
    if path.is_file():
        from .inspect_bank import inspect_bank

        inspect_bank(path, as_json=as_json, ref=ref, model_dir=model, verify=verify, echo=typer.echo)
        return
    if ref is not None or verify:
        raise M3Error("--ref and --verify apply to .m3bank files")
    if path.is_dir():
        cfg, kind = read_config(path), "model_dir"
    elif target in PRESETS:
        cfg, kind = PRESETS[target], "preset"
    else:
        raise M3Error(f"{target} is neither a bank, a model dir nor a preset ({', '.join(PRESETS)})")
    info = {"kind": kind, "source": target, **config_summary(cfg)}
    if as_json:
        typer.echo(json.dumps(info))
        return
    print_fields(info)


@app.command("index", epilog="Examples:\n\n  m3 index kb.m3bank\n\n  m3 index kb.m3bank --factory HNSW32\n\n"
                             "  m3 index kb.m3bank --factory IVF4096,PQ32 --nprobe 32\n\n"
                             "  m3 index kb.m3bank --factory PCA128,HNSW32,RFlat --k-factor 8 --ef-construction 100\n\n"
                             "  m3 index kb.m3bank --embedder self --model out/smollm2")
@user_errors
def index_cmd(
    bank: Annotated[Path, typer.Argument(help="The .m3bank to index (updated in place; rewritten whole only "
                                                     "when replaced indexes would make up a quarter of it).")],
    embedder: Annotated[str, typer.Option(help="minilm (default, offline), self (the bank's model: needs "
                                               "--model), a local Hugging Face encoder dir, or a static "
                                               "embedder dir (m3 distill-embedder).")] = "minilm",
    pooling: Annotated[str, typer.Option(help="Pooling for an encoder dir: mean or cls.")] = "mean",
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model dir, for --embedder self "
                                                  "(default: the model the bank names).")] = None,
    factory: Annotated[str, typer.Option(help="FAISS index factory: Flat, HNSW32, IVF4096,PQ32, …")] = "Flat",
    nprobe: Annotated[int, typer.Option(help="IVF lists searched per query (stored in the bank).")] = 16,
    ef_search: Annotated[int, typer.Option("--ef-search", help="HNSW search depth (stored in the bank).")] = 64,
    ef_construction: Annotated[Optional[int], typer.Option("--ef-construction", help="HNSW graph-building depth "
                                                           "(default: FAISS's 40; higher: more recall at the same "
                                                           "--ef-search, slower to build).")] = None,
    k_factor: Annotated[Optional[int], typer.Option("--k-factor", help="For a factory ending in ,RFlat: "
                                                    "candidates per result re-ranked with the exact vectors "
                                                    "(default: FAISS's 1; e.g. 8 with PCA128,HNSW32,RFlat).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts embedded per batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Embed a bank's references (if needed) and store a FAISS retrieval index in it.

    Embeddings already in the bank from the same embedder are reused, so rebuilding the index
    with another factory is quick. Reference ids survive rebuilds: FAISS rows map to references
    explicitly. Interrupted embedding resumes when the command is run again.
    """
    from .bank import Bank, require_same_model
    from .device import resolve_device
    from .embed import load_embedder
    from .retrieval import index_bank

    if not 1 <= batch_size <= MAX_BATCH:
        raise M3Error(f"--batch-size must be in 1..{MAX_BATCH}")
    Bank(bank).close()  # a clear error for a bad bank before loading any model
    if embedder == "self":  # the bank's own model embeds: the one it names, unless told otherwise
        from .checkpoint import model_fingerprint

        model = resolve_model(model, bank)
        with Bank(bank) as b:
            require_same_model(b, model_fingerprint(model))
    emb = load_embedder(embedder, model_dir=model, pooling=pooling, device=resolve_device(device))
    info = index_bank(bank, emb, factory=factory, batch_size=batch_size, show_progress=not quiet,
                      nprobe=nprobe, ef_search=ef_search, ef_construction=ef_construction, k_factor=k_factor)
    typer.echo(f"indexed {bank}: {info['references']} references, {info['factory']} over {info['embedder']} "
               f"embeddings (dim {info['dim']}{', computed' if info['embedded'] else ', reused'}), "
               f"index {info['index_bytes']:,} B")


@app.command("distill-embedder", epilog="Examples:\n\n  m3 distill-embedder models/minilm-static\n\n"
             "  m3 distill-embedder models/kb-static --idf-corpus kb.parquet\n\n"
             "  m3 index kb.m3bank --embedder models/minilm-static\n\n"
             "  m3 generate --model out/proof/model --bank kb.m3bank --embedder models/minilm-static \"…\"")
@user_errors
def distill_embedder(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write (m3-embedder.json, static.safetensors, "
                                                 "tokenizer.json).")],
    source: Annotated[str, typer.Option("--from", help="The teacher: minilm (default, offline) or a local Hugging "
                                                       "Face encoder dir.")] = "minilm",
    pooling: Annotated[str, typer.Option(help="The teacher's pooling, for an encoder dir: mean or cls.")] = "mean",
    dims: Annotated[Optional[int], typer.Option(help="Dimensions kept by PCA (at most the teacher's; default "
                                                     "256, or the teacher's width if smaller).")] = None,
    sif: Annotated[float, typer.Option(help="SIF weight a: a token of estimated frequency p is scaled by "
                                            "a / (a + p) (without --idf-corpus).")] = 1e-4,
    idf_corpus: Annotated[Optional[Path], typer.Option("--idf-corpus", help="Weigh tokens by their inverse "
                                                       "document frequency in this corpus (Parquet or JSONL, as "
                                                       "for m3 encode; e.g. the knowledge base) instead of by "
                                                       "Zipf rank: much better at names.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Vocabulary tokens per teacher call.")] = 1024,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if m3 wrote it.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Distill a static query embedder from a sentence encoder (Model2Vec's method).

    Every vocabulary token goes through the encoder once; PCA and token weights follow (Zipf-
    estimated SIF weights, or with --idf-corpus the tokens' inverse document frequency in that
    corpus). The result embeds a text as the mean of its tokens' vectors: about a hundred times
    cheaper than MiniLM on a CPU, for some loss of retrieval quality (README, Retrieval). Index
    a bank with it (`m3 index --embedder DIR`) and pass the same DIR to commands that query it.
    """
    from .device import resolve_device
    from .embed import HFEncoder, distill_static, load_embedder

    if not 1 <= batch_size <= MAX_BATCH:
        raise M3Error(f"--batch-size must be in 1..{MAX_BATCH}")
    if source == "self":
        raise M3Error("--from self: the teacher must be minilm or a Hugging Face encoder dir")
    teacher = load_embedder(source, pooling=pooling, device=resolve_device(device))
    if not isinstance(teacher, HFEncoder):
        raise M3Error(f"--from {source}: the teacher must be minilm or a Hugging Face encoder dir")
    texts = None
    if idf_corpus is not None:
        from .corpus import read_corpus

        texts = (doc.text for doc in read_corpus(idf_corpus))
    info = distill_static(teacher, out_dir, dims=dims, sif=sif, batch_size=batch_size, overwrite=force,
                          show_progress=not quiet, idf_texts=texts, idf_source=str(idf_corpus or ""))
    weights = (f"IDF weights from {info['idf_documents']} documents" if info["weights"] == "idf"
               else f"SIF weights (a = {info['sif']:g})")
    typer.echo(f"wrote {out_dir}: {info['vocab_size']} token vectors of dim {info['dim']}, distilled from "
               f"{info['teacher']}, {weights}")


@app.command(epilog="Examples:\n\n  m3 search kb.m3bank \"Who founded the Northwind Institute?\"\n\n"
                    "  cat questions.txt | m3 search kb.m3bank - -k 3 --json | jq .results[0].ref\n\n"
                    "  m3 search kb.m3bank \"capital of France\" --max-overlap 0.67")
@user_errors
def search(
    bank: Annotated[Path, typer.Argument(help="An indexed .m3bank.")],
    query: Annotated[str, typer.Argument(help="The query, or - to read one query per line from standard input.")],
    k: Annotated[int, typer.Option("-k", help="References per query.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per query (JSON lines).")] = False,
    max_overlap: Annotated[Optional[float], typer.Option("--max-overlap", help="Drop references whose overlap "
                                                          "with the query (Eq. 6, words) exceeds this, e.g. 0.67.")] = None,
    max_gap: Annotated[Optional[float], typer.Option("--max-score-gap", help="Drop references scoring more than "
                                                      "this below the query's best; default: keep all.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model dir, for banks indexed with "
                                                  "the `self` embedder (default: the model the bank names).")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="Encoder or static embedder dir, for banks indexed with one.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Top-k references of a bank for a query, with scores and text."""
    from .bank import Bank
    from .device import resolve_device
    from .retrieval import Retriever, query_embedder

    if k < 1:
        raise M3Error("-k must be at least 1")
    _check_gap(max_gap)
    queries = [query] if query != "-" else [q for q in _read_text_arg("-").splitlines() if q.strip()]
    if not queries:
        raise M3Error("no query on standard input")
    with Bank(bank) as b:
        if b.header.get("m3.embed.name") == "self":  # queries go through the bank's own model
            model = resolve_model(model, bank)
        emb = query_embedder(b, model_dir=model, encoder=embedder, device=resolve_device(device))
        results = Retriever(b, emb).search(queries, k=k, max_overlap=max_overlap, max_gap=max_gap)
        for q, hits in zip(queries, results):
            if as_json:
                typer.echo(json.dumps({"query": q, "results": [h.__dict__ for h in hits]}, ensure_ascii=False))
                continue
            if len(queries) > 1:
                typer.echo(f"# {terminal_safe(q)}")
            for h in hits:
                text = " ".join(h.text.split())
                typer.echo(f"{h.score:7.4f}  ref {h.ref:<6} {terminal_safe(h.title or h.doc_id)}: "
                           f"{terminal_safe(text[:160])}{'…' if len(text) > 160 else ''}")


@contextlib.contextmanager
def _open_generator(model: Path, bank: Optional[Path], device: str, dtype: str, embedder: Optional[str],
                    cache_size: int = 4096):
    """Load the model (and the bank with its retriever, checking the bank belongs to the model);
    yield (Generator, tokenizer)."""
    from .checkpoint import load_model_dir, load_tokenizer, model_fingerprint, read_config
    from .device import resolve_device, resolve_dtype
    from .generate import Generator

    read_config(model)  # fail fast on a bad dir before loading anything heavy
    b = None
    try:
        if bank is not None:
            from .bank import Bank, require_same_model

            b = Bank(bank)
            require_same_model(b, model_fingerprint(model))
        tokenizer = load_tokenizer(model)
        dev = resolve_device(device)
        net = load_model_dir(model, dev, resolve_dtype(dev, dtype))
        retriever = None
        if b is not None:
            from .retrieval import Retriever, query_embedder

            retriever = Retriever(b, query_embedder(b, model_dir=model, encoder=embedder, device=dev, model=net,
                                                    tokenizer=tokenizer))
        yield Generator(net, tokenizer, retriever, cache_capacity=cache_size), tokenizer
    finally:
        if b is not None:
            b.close()


def _read_prompts(prompt: str | None) -> list[str]:
    """One prompt, or (for - or none) one per line of standard input; JSON lines need a "prompt" field."""
    if prompt is not None and prompt != "-":
        return [prompt]
    if prompt is None and sys.stdin.isatty():
        raise M3Error("no prompt: give one (m3 generate \"…\") or pipe prompts on standard input, one per line")
    prompts = []
    for n, line in enumerate(_read_text_arg("-").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise M3Error(f"standard input line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise M3Error(f"standard input line {n}: a JSON line needs a string field \"prompt\"")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise M3Error("no prompt on standard input")
    return prompts


def _explain(completion, bank, echo) -> None:
    """The references each chunk read, for a person."""
    if not completion.chunks:
        return
    echo("--- references")
    for rec in completion.chunks:
        where = {"prompt": f"prompt tokens {rec.tokens[0]}-{rec.tokens[1]}",
                 "inherited": f"generated tokens {rec.tokens[0]}-{rec.tokens[1]}, inherits the last prompt chunk's",
                 "generated": f"generated tokens {rec.tokens[0]}-{rec.tokens[1]}, retrieved with the generated "
                              f"tokens before it"}[rec.source]
        echo(f"chunk {rec.chunk} ({where}):")
        if not rec.hits:
            echo("  (no reference)")
        for j, h in enumerate(rec.hits):
            attn = f"  attention {rec.attention[j]:.1%}" if rec.attention is not None else ""
            text = " ".join(h.text.split())
            echo(f"  ref {h.ref:<6} score {h.score:.3f}{attn}  {terminal_safe(h.title or h.doc_id)}: "
                 f"{terminal_safe(text[:120])}{'…' if len(text) > 120 else ''}")


@app.command(epilog="Examples:\n\n  m3 generate --bank kb.m3bank \"What is the capital of Mali?\"\n\n"
                    "  m3 generate --bank kb.m3bank --explain --chat \"Who founded Northwind?\"\n\n"
                    "  m3 generate --mode none \"Once upon a time\"\n\n"
                    "  cat questions.txt | m3 generate --bank kb.m3bank --json | jq -r .text\n\n"
                    "  m3 generate --model out/smollm2 --bank kb.m3bank \"Where is Bamako?\"")
@user_errors
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt. Without it (or with -), prompts come from "
                                                         "standard input: one per line, or JSON lines with a "
                                                         "\"prompt\" field.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    bank: Annotated[Optional[Path], typer.Option("--bank", "-b", help=BANK_HELP)] = None,
    mode: Annotated[Optional[str], typer.Option(help="memory (explicit memory), none (closed book) or rag (the "
                                                     "retrieved references' text in front of the prompt); "
                                                     "default: memory with --bank, else none.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy; higher samples more freely.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest set of tokens "
                                                         "holding this probability.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens (0 = off).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the tokenizer's chat template.")] = False,
    memories: Annotated[int, typer.Option(help="References retrieved per chunk.")] = 5,
    retrieve_every: Annotated[int, typer.Option("--retrieve-every", help="While decoding, retrieve new memories "
                                                "after this many generated tokens.")] = 64,
    max_overlap: Annotated[Optional[float], typer.Option("--max-overlap", help="Drop references whose overlap "
                                                          "with the query text (Eq. 6) exceeds this, e.g. 0.67.")] = None,
    max_gap: Annotated[Optional[float], typer.Option("--max-score-gap", help="Drop references scoring more than "
                                                      "this below the chunk's best (retriever confidence: a clear "
                                                      "winner is read alone); default: keep all.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts generated together.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt: text, and per chunk the "
                                                         "references read, their scores and attention share.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="After each answer, list the references each chunk "
                                                            "read, with titles, text and attention share.")] = False,
    embedder: Annotated[Optional[str], typer.Option(help="Encoder or static embedder dir, for banks indexed with one.")] = None,
    cache_size: Annotated[int, typer.Option("--cache-size", help="Decoded memories kept in the LRU cache.")] = 4096,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16.")] = "auto",
) -> None:
    """Generate text while the model reads its explicit memories.

    Each 64-token chunk of the prompt retrieves its own memories; while decoding, every 64
    generated tokens retrieve the next chunk's. One prompt streams to standard output; prompts
    from standard input give one line per answer, in order (--json: one JSON object per line).
    """
    bank = resolve_bank(bank)
    from .generate import Options

    mode = mode or ("memory" if bank is not None else "none")
    opts = Options(mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   seed=seed, memories=memories, retrieve_every=retrieve_every, max_overlap=max_overlap, chat=chat,
                   cite=as_json or explain, max_gap=max_gap)
    opts.check()
    if not 1 <= batch_size <= MAX_BATCH:
        raise M3Error(f"--batch-size must be in 1..{MAX_BATCH}")
    prompts = _read_prompts(prompt)
    model = resolve_model(model, bank)
    if mode == "none" and bank is not None:
        bank = None  # closed book: the bank is not read (it only named the model)
    with _open_generator(model, bank, device, dtype, embedder, cache_size) as (gen, _):
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            stream = len(prompts) == 1 and not as_json

            def on_text(b: int, piece: str) -> None:
                sys.stdout.write(piece)
                sys.stdout.flush()

            for c in gen.generate(batch, opts, on_text=on_text if stream else None, first_number=start + 1):
                if as_json:
                    typer.echo(json.dumps(c.to_json(mode), ensure_ascii=False))
                    continue
                # several prompts: one line per answer (whitespace runs made single spaces), so a
                # program pairs answers with prompts line by line; --json keeps the exact text
                typer.echo("" if stream else " ".join(c.text.split()))
                if explain:
                    _explain(c, gen.retriever and gen.retriever.bank, typer.echo)



@app.command(epilog="Examples:\n\n  m3 bench --model small --synthetic-refs 10000 --batch 1,8\n\n"
                    "  m3 bench --model out/smollm2 --bank kb.m3bank --batch 1,8,32 --json | jq .ratios\n\n"
                    "  m3 bench --model small --synthetic-refs 10000 --embedder models/minilm-static\n\n"
                    "  m3 bench --model memory3-2.4b --synthetic-refs 2000 --embedder self --batch 32 --device cuda")
@user_errors
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="m3 model dir, or a preset name (random weights, with "
                                                              "a synthetic bank: see --synthetic-refs).")],
    bank: Annotated[Optional[Path], typer.Option("--bank", "-b", help="An indexed bank encoded by MODEL.")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8",
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens per sequence.")] = 128,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per sequence.")] = 128,
    modes: Annotated[str, typer.Option(help="Modes to compare, comma-separated.")] = "none,memory,rag",
    memories: Annotated[int, typer.Option(help="References per chunk (memory) or in front (rag).")] = 5,
    repeats: Annotated[int, typer.Option(help="Timed runs per (batch, mode); the median is reported.")] = 3,
    synthetic_refs: Annotated[int, typer.Option("--synthetic-refs", help="With a preset: references in the "
                                                "synthetic bank.")] = 10000,
    embedder: Annotated[str, typer.Option(help="With a preset: the query embedder the synthetic bank is "
                                               "indexed for, minilm, self or a static embedder dir; with --bank "
                                               "indexed by an encoder or static embedder dir: that dir.")] = "minilm",
    codec: Annotated[str, typer.Option(help="With a preset: the synthetic bank's codec.")] = "bf16",
    text: Annotated[str, typer.Option(help="With a preset: the references' text, wikipedia (the installed "
                                           "summaries package; pseudo-text if missing) or pseudo.")] = "wikipedia",
    workdir: Annotated[Optional[Path], typer.Option(help="With a preset: keep the synthetic model and bank here "
                                                         "(default: a temporary dir, removed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {\"results\": [...], \"ratios\": [...]}.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16.")] = "auto",
) -> None:
    """Decode throughput of none, memory and rag on the same model, side by side in one run.

    Each row is the median of --repeats runs, modes interleaved; each run starts with an empty
    memory cache. Time is broken down into retrieval, memory load, prefill and decode.
    """
    import tempfile

    from .bank import CODECS
    from .bench import ratios, run_bench, synthetic_setup
    from .config import PRESETS
    from .device import resolve_device

    try:
        batches = [int(b) for b in batch.split(",")]
        mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    except ValueError:
        raise M3Error(f"--batch must be comma-separated integers, got {batch!r}") from None
    if not batches or min(batches) < 1:
        raise M3Error("--batch sizes must be at least 1")
    bad = [m for m in mode_list if m not in ("none", "memory", "rag")]
    if bad or not mode_list:
        raise M3Error(f"unknown mode {bad[0] if bad else modes!r}; choose from none, memory, rag")
    if repeats < 1 or prompt_len < 1 or new_tokens < 1 or memories < 1:
        raise M3Error("--repeats, --prompt-len, --new-tokens and --memories must be at least 1")
    log = lambda s: typer.echo(s, err=True)  # noqa: E731 (progress and setup notes: stdout carries only results)
    with contextlib.ExitStack() as stack:
        if not Path(model).is_dir() and model in PRESETS:
            if bank is not None:
                raise M3Error("--bank needs a model dir (the model that encoded it), not a preset")
            if codec not in CODECS or codec == "vq":
                raise M3Error("--codec for a synthetic bank: bf16 or int8")
            if synthetic_refs < 1:
                raise M3Error("--synthetic-refs must be at least 1")
            if embedder not in ("minilm", "self") and not (Path(embedder) / "m3-embedder.json").is_file():
                raise M3Error("--embedder for a synthetic bank: minilm, self or a static embedder dir "
                              "(m3 distill-embedder)")
            where = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="m3-bench-")))
            where.mkdir(parents=True, exist_ok=True)
            if text not in ("wikipedia", "pseudo"):
                raise M3Error("--text: wikipedia or pseudo")
            model_dir, bank = synthetic_setup(model, synthetic_refs, where, embedder, codec=codec, log=log,
                                              device=resolve_device(device), text=text)
        else:
            model_dir = Path(model)
        encoder = None if embedder in ("minilm", "self") else embedder  # a bank indexed with an encoder dir
        gen, _ = stack.enter_context(_open_generator(model_dir, bank, device, dtype, encoder))
        rows = run_bench(gen, batches, prompt_len, new_tokens, mode_list, repeats, memories, log=log)
        summary = ratios(rows)
        info = {"model": model, "device": str(resolve_device(device)), "prompt_len": prompt_len,
                "new_tokens": new_tokens, "bank_refs": gen.retriever.bank.n_refs if gen.retriever else 0}
        if as_json:
            typer.echo(json.dumps({"setup": info, "results": rows, "ratios": summary}))
            return
        typer.echo("\n| batch | mode | tokens/s | total s | retrieval s | memory load s | prefill s | decode s |")
        typer.echo("|---|---|---|---|---|---|---|---|")
        for r in rows:
            typer.echo(f"| {r['batch']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['total_s']:.3f} | "
                       f"{r.get('retrieval_s', 0):.3f} | {r.get('memory_load_s', 0):.3f} | {r.get('prefill_s', 0):.3f} | "
                       f"{r.get('decode_s', 0):.3f} |")
        for s in summary:
            typer.echo("batch {batch}: ".format(**s) + ", ".join(f"{k.replace('_vs_', '/')} {v:.2f}x"
                                                                  for k, v in s.items() if k != "batch"))


@app.command(epilog="Examples:\n\n  m3 synth out/synth --people 400 --seed 0\n\n"
                    "  m3 synth out/synth --force && head -2 out/synth/qa_unseen.jsonl")
@user_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create with train.parquet, kb.parquet, "
                                                 "qa_seen.jsonl, qa_unseen.jsonl and synth.json.")],
    people: Annotated[int, typer.Option(help="Invented people; 10% (at most 500) are unseen: their facts are "
                                             "only in kb.parquet.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same files.")] = 0,
    namesake_pairs: Annotated[int, typer.Option("--namesake-pairs", help="Add N training documents of one "
                                                "question-answer line about each of two seen namesakes (only "
                                                "the names tell whose memory answers). The other files do not "
                                                "change.")] = 0,
    qa_only: Annotated[bool, typer.Option("--qa-only", help="Leave each seen person's biography (with its two "
                                               "question-answer lines) out of train.parquet; the three-question "
                                               "documents stay, so until a model has seen them their answers are "
                                               "only in kb.parquet. The other files do not change.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if m3 synth wrote it.")] = False,
) -> None:
    """Write a deterministic synthetic knowledge task: invented people with attributes.

    train.parquet talks about the seen people (biographies and question-answer lines);
    kb.parquet holds differently worded biographies of seen and unseen people; the questions
    about unseen people can only be answered from the bank.
    """
    from .synth import synthesize

    info = synthesize(out_dir, n_people=people, seed=seed, overwrite=force, n_pairs=namesake_pairs, qa_only=qa_only)
    typer.echo(f"wrote {out_dir}: {info['train_texts']} training texts about {info['seen']} seen people, "
               f"{info['kb_texts']} kb texts, {info['qa_seen']} + {info['qa_unseen']} questions (seen + unseen)")


@app.command(epilog="Examples:\n\n"
                    "  m3 pretrain out/synth/train.parquet -o out/proof/warm --stage warmup --config synth --steps 500\n\n"
                    "  m3 pretrain out/synth/train.parquet -o out/proof/model --stage continual "
                    "--init-from out/proof/warm --bank out/proof/kb.m3bank --steps 3000\n\n"
                    "  m3 pretrain corpus.parquet -o models/smol-m3 --stage continual --init-from out/smollm2 "
                    "--bank kb.m3bank --train memory-attention --lr 1e-4\n\n"
                    "  accelerate launch -m m3cli pretrain corpus.parquet -o big --config memory3-2.4b --stage warmup")
@user_errors
def pretrain(
    corpus: Annotated[str, typer.Argument(help="Training text: Parquet or JSONL with a text column.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The model dir to write at the end.")],
    stage: Annotated[str, typer.Option(help="warmup (plain LM training) or continual (each chunk reads "
                                            "memories of retrieved references, encoded in real time).")] = "warmup",
    config: Annotated[Optional[str], typer.Option(help="Preset to train from scratch (a BPE tokenizer is trained "
                                                       "on the corpus).")] = None,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Start from this model dir (e.g. a "
                                                      "converted Hugging Face model, or the warmup stage).")] = None,
    bank: Annotated[Optional[Path], typer.Option("--bank", "-b", help="continual: an indexed bank whose "
                                                 "references the chunks retrieve (only its text and index are "
                                                 "used).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step (per process).")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    schedule: Annotated[str, typer.Option(help="wsd (warmup-stable-decay), cosine or constant.")] = "wsd",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear learning-rate warmup steps.")] = 50,
    min_lr_ratio: Annotated[float, typer.Option("--min-lr-ratio", help="Final learning rate / peak.")] = 0.1,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.1,
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size", help="From scratch: BPE vocabulary "
                                                      "(default: the preset's).")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="From scratch: use this model dir's tokenizer "
                                                           "instead of training one.")] = None,
    train: Annotated[str, typer.Option("--train", help="all; memory-attention (only the memory layers' "
                                                       "attention); or reader (continual, --init-from: only a "
                                                       "memory reader trains, the model stays frozen and reads "
                                                       "as before without memory; --refs-per-chunk is what each "
                                                       "chunk reads, e.g. 5).")] = "all",
    reader_rank: Annotated[int, typer.Option("--reader-rank", help="--train reader: rank of the memory "
                                                                   "reader's query and output deltas.")] = 16,
    compile_model: Annotated[bool, typer.Option("--compile", help="--train reader: torch.compile the model "
                                                                  "(pays on a GPU).")] = False,
    max_time: Annotated[float, typer.Option("--max-time", help="--train reader: stop after this many seconds "
                                                               "of training, at a checkpoint (0: no limit); "
                                                               "--resume continues.")] = 0.0,
    detach_memory: Annotated[bool, typer.Option("--detach-memory", help="continual: no gradient through the "
                                                                        "memory encoding.")] = False,
    memory_selection: Annotated[Optional[str], typer.Option("--memory-selection", help="Token score for keeping "
                                                            "memory tokens: attention (the paper) or "
                                                            "attention_x_value_norm (discounts attention sinks).")] = None,
    memory_top_k: Annotated[Optional[int], typer.Option("--memory-top-k", help="Tokens kept per memory layer "
                                                        "and KV head (default: the model's).")] = None,
    memory_layers: Annotated[Optional[str], typer.Option("--memory-layers", help="Layers that read memory: "
                                                         "first-half (the paper), all, or indices like 0,1,2 "
                                                         "(default: the model's).")] = None,
    refs_per_chunk: Annotated[int, typer.Option("--refs-per-chunk", help="continual: references each chunk "
                                                "retrieves (1 = the paper; 5 = what inference reads, "
                                                "namesakes and other near misses included).")] = 1,
    single_ref_steps: Annotated[int, typer.Option("--single-ref-steps", help="continual: for the first N "
                                                  "steps each chunk reads only its top-1 reference (a "
                                                  "curriculum: learn to read memory, then to tell references "
                                                  "apart).")] = 0,
    align_docs: Annotated[bool, typer.Option("--align-docs", help="Start every document at a 64-token chunk "
                                             "boundary (padding gets no loss), so each chunk's retrieval "
                                             "query is about one document.")] = False,
    prev_chunks: Annotated[Optional[int], typer.Option("--prev-chunks", help="continual: a chunk also reads "
                                                       "the memories of the N chunks before it (default: the "
                                                       "model's train_prev_chunks, 4; saved in the new model).")] = None,
    memory_match_loss: Annotated[float, typer.Option("--memory-match-loss", help="continual: weight of an "
                                                     "auxiliary loss that steers the memory layers' attention "
                                                     "to the memory of the reference whose title the text last "
                                                     "mentioned (0 = off, the paper).")] = 0.0,
    distractors: Annotated[str, typer.Option("--distractors", help="continual, with --refs-per-chunk K > 1: "
                                             "retrieved (the chunk's own top-K) or title (its top-1, plus the "
                                             "K-1 references retrieved with that reference's title: the "
                                             "namesakes a question about it meets at inference).")] = "retrieved",
    embedder: Annotated[Optional[str], typer.Option(help="continual: the encoder or static embedder dir the "
                                                         "bank was indexed with (minilm and self need none).")] = None,
    memory_score_prior: Annotated[bool, typer.Option("--memory-score-prior", help="Give the model the "
                                                     "retriever-score prior (not in the paper): each memory's "
                                                     "attention logits get a learned gain times how far its "
                                                     "retriever score falls below its chunk's best; the gains "
                                                     "start at 0 (the model reads as before) and are saved.")] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps.")] = 200,
    log_every: Annotated[int, typer.Option("--log-every", help="Write metrics every N steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (bf16 mixed precision on CUDA).")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a Memory3 model: warmup (no memory), then continual training with explicit memory.

    Checkpoints, metrics.jsonl (loss, learning rate, tokens/s per --log-every steps) and the
    chunks' retrievals live in OUTPUT.train/; a killed run continues with --resume and ends
    with the same weights. When the weights change, banks encoded by the old model must be
    re-encoded (their fingerprint no longer matches).
    """
    from .train import TrainArgs
    from .train import pretrain as run

    args = TrainArgs(stage=stage, corpus=corpus, output=output, config=config, init_from=init_from, bank=bank,
                     tokenizer=tokenizer, vocab_size=vocab_size, steps=steps, batch_size=batch_size, seq_len=seq_len,
                     lr=lr, min_lr_ratio=min_lr_ratio, schedule=schedule, warmup_steps=warmup_steps,
                     weight_decay=weight_decay, save_every=save_every, log_every=log_every, seed=seed,
                     detach_memory=detach_memory, train=train, device=device, memory_selection=memory_selection,
                     memory_top_k=memory_top_k, memory_layers=memory_layers, refs_per_chunk=refs_per_chunk,
                     prev_chunks=prev_chunks, single_ref_steps=single_ref_steps, align_docs=align_docs,
                     memory_match_loss=memory_match_loss, distractors=distractors, embedder=embedder,
                     score_prior=memory_score_prior, reader_rank=reader_rank, compile=compile_model,
                     max_time=max_time)
    if config is not None:
        from .config import PRESETS

        if config not in PRESETS:
            raise M3Error(f"unknown preset {config!r}; choose one of {', '.join(PRESETS)}")
    from .atomic import output_lock

    try:
        with output_lock(output) if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else contextlib.nullcontext():
            summary = run(args, resume=resume, force=force, show_progress=not quiet,
                          log=lambda m: typer.echo(m, err=True))
    except KeyboardInterrupt:
        typer.echo("m3: interrupted; run the same command with --resume to continue from the last checkpoint",
                   err=True)
        raise typer.Exit(130)
    if summary.get("stopped_at") is not None:
        typer.echo(f"stopped at step {summary['stopped_at']} of {summary['steps']} (--max-time), checkpoint in "
                   f"{summary['state_dir']}; run the same command with --resume to continue")
        return
    if "fingerprint" not in summary:
        return  # not the main process
    mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
    typer.echo(f"wrote {summary['output']}: {summary['stage']} stage, {summary['steps']} steps, final loss "
               f"{summary['final_loss']:.4f}, {summary['tokens_per_s']:.0f} tokens/s{mfu}, "
               f"{summary['mean_step_s']:.3f} s/step; metrics in {summary['state_dir']}/metrics.jsonl")
    if summary.get("reader"):
        typer.echo(f"the memory reader alone ({summary['reader_parameters']:,} parameters): {summary['reader']}")
    if summary.get("previous_fingerprint"):
        typer.echo(f"the weights changed ({summary['previous_fingerprint'][:19]}… -> {summary['fingerprint'][:19]}…): "
                   f"banks encoded by {init_from} must be re-encoded with {output}")


@app.command("eval", epilog="Examples:\n\n  m3 eval --model out/proof/model --bank out/proof/kb.m3bank "
                            "--qa out/proof/qa_unseen.jsonl --show 5\n\n"
                            "  m3 eval --model out/smollm2 --bank kb.m3bank --qa countries.jsonl --modes none,memory,rag "
                            "--json | jq .memory.accuracy")
@user_errors
def eval_cmd(
    qa: Annotated[Path, typer.Option("--qa", help="JSONL with {\"question\", \"answer\"} per line (optional \"title\": the document it is about).")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    bank: Annotated[Optional[Path], typer.Option("--bank", "-b", help=BANK_HELP + " For memory and "
                                                 "rag.")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="Held-out text (Parquet/JSONL corpus) for "
                                                                "perplexity per mode.")] = None,
    modes: Annotated[Optional[str], typer.Option(help="Comma-separated; default none,memory,rag with --bank, "
                                                      "else none.")] = None,
    prompt_template: Annotated[str, typer.Option("--prompt-template", help="How a question becomes a prompt.")] = \
        "Question: {question} Answer:",
    chat: Annotated[bool, typer.Option("--chat", help="Wrap prompts in the tokenizer's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 12,
    memories: Annotated[int, typer.Option(help="References per chunk (memory) or in front (rag).")] = 5,
    max_overlap: Annotated[float, typer.Option("--max-overlap", help="Drop references whose overlap with the "
                                                "question exceeds this (the paper's 2/3).")] = 0.67,
    max_gap: Annotated[Optional[float], typer.Option("--max-score-gap", help="Drop references scoring more than "
                                                      "this below the chunk's best (retriever confidence: a clear "
                                                      "winner is read alone); default: keep all.")] = None,
    score_prior: Annotated[bool, typer.Option("--score-prior/--no-score-prior", help="For a model trained with "
                                              "--memory-score-prior: --no-score-prior hides the retriever's "
                                              "scores from it, so it reads its memories by content alone (the "
                                              "paper's Eq. 4), for comparison.")] = True,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    embedder: Annotated[Optional[str], typer.Option(help="Encoder or static embedder dir, for banks indexed with one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {mode: {accuracy, n, correct, chance, "
                                                         "perplexity}}; memory also has right_retrieved, "
                                                         "right_first, right_attention(_even) when questions "
                                                         "have a \"title\".")] = False,
    show: Annotated[int, typer.Option("--show", help="Also print the first N questions with every mode's "
                                                     "answer side by side.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16.")] = "auto",
) -> None:
    """Answer the same questions closed book, with memory and with RAG, in one run.

    A question counts as answered when the answer appears in the first sentence of the greedy
    completion (leading blank lines skipped). With --text, also held-out perplexity per mode
    (the same tokens in every mode). When the questions name their knowledge-base document
    ("title", as `m3 synth` writes), memory mode also says how often that document was retrieved
    (and first) and what share of the memory attention it got as the answer began: a retrieval
    failure or a reading failure.
    """
    bank = resolve_bank(bank)
    from .evaluate import evaluate, read_qa

    mode_list = [m.strip() for m in (modes or ("none,memory,rag" if bank else "none")).split(",") if m.strip()]
    bad = [m for m in mode_list if m not in ("none", "memory", "rag")]
    if bad or not mode_list:
        raise M3Error(f"unknown mode {bad[0] if bad else modes!r}; choose from none, memory, rag")
    if bank is None and set(mode_list) - {"none"}:
        raise M3Error("modes memory and rag need --bank")
    if limit is not None and limit < 1:
        raise M3Error("--limit must be at least 1")
    if not 1 <= batch_size <= MAX_BATCH:
        raise M3Error(f"--batch-size must be in 1..{MAX_BATCH}")
    _check_gap(max_gap)
    if "{question}" not in prompt_template:
        raise M3Error("--prompt-template must contain {question}")
    questions = read_qa(qa, limit)
    model = resolve_model(model, bank)
    texts = None
    if text is not None:
        from .corpus import read_corpus

        texts = [d.text for d in read_corpus(text) if d.text.strip()]
        if not texts:
            raise M3Error(f"{text} holds no text")
    from .output import stderr_progress

    with _open_generator(model, bank, device, dtype, embedder) as (gen, _), stderr_progress("eval") as bar:
        tasks: dict = {}

        def on_progress(mode: str, done: int, total: int) -> None:
            if mode not in tasks:
                tasks[mode] = bar.add_task(mode, total=total)
            bar.update(tasks[mode], completed=done)

        result = evaluate(gen, questions, mode_list, template=prompt_template, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, max_overlap=max_overlap, memories=memories, texts=texts,
                          chat=chat, max_gap=max_gap, score_prior=score_prior, progress=on_progress)
    answers = result.pop("_answers")
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{len(questions)} questions from {qa}")
    for mode in mode_list:
        r = result[mode]
        extra = f", chance {r['chance']:.3f}" if "chance" in r else ""
        extra += f", perplexity {r['perplexity']:.3f}" if "perplexity" in r else ""
        typer.echo(f"  {mode:6s} accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']}{extra})")
        if "right_retrieved" in r:
            att = "-" if r["right_attention"] is None else \
                f"{r['right_attention']:.3f} ({r['right_attention_even']:.3f} if even)"
            typer.echo(f"         asked document: retrieved {r['right_retrieved']:.3f}, first {r['right_first']:.3f}, "
                       f"memory attention {att}")
    from .evaluate import first_sentence, is_correct

    for j, q in enumerate(questions[:max(0, show)]):
        typer.echo(f"\n{terminal_safe(q['question'])}  (answer: {terminal_safe(q['answer'])})")
        for m in mode_list:
            mark = "right" if is_correct(q["answer"], answers[m][j]) else "wrong"
            typer.echo(f"  {m:6s} {mark}  {terminal_safe(first_sentence(answers[m][j]).strip())!r}")


def _check_gap(max_gap: float | None) -> None:
    """Before any model or bank loads."""
    from .retrieval import check_max_gap

    check_max_gap(max_gap)


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
