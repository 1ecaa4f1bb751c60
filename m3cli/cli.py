"""The `m3` command line. Each command parses its arguments, calls one library function and
prints; heavy imports live inside the commands so that `m3 --help` is instant.

User mistakes raise M3Error and end as one line on stderr with exit status 1.
"""

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import M3Error

app = typer.Typer(
    name="m3",
    help="Memory3 language models with explicit memory: convert, score, encode, inspect (and soon "
         "index, generate, pretrain).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_ERROR = 1


def terminal_safe(text: str) -> str:
    """Escape control characters (except newline and tab) so file contents cannot drive the terminal."""
    return "".join(c if c in "\n\t" or (c.isprintable() and c not in "\x1b") else repr(c)[1:-1] for c in text)


def _fail(message: str) -> None:
    one_line = " ".join(terminal_safe(str(message)).split())
    typer.echo(f"m3: error: {one_line}", err=True)
    raise typer.Exit(EXIT_ERROR)


def user_errors(fn):
    """Turn M3Error/ConfigError into a one-line message and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import ConfigError

        try:
            return fn(*args, **kwargs)
        except (M3Error, ConfigError) as e:
            _fail(str(e))
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
                    "  cat doc.txt | m3 score --model models/smollm2 --json - | jq .perplexity")
@user_errors
def score(
    text: Annotated[str, typer.Argument(help="The text to score, or - to read it from standard input.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="m3 model dir.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {token_ids, logprobs, perplexity} as JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16.")] = "auto",
) -> None:
    """Per-token log-probabilities and perplexity of a text.

    logprobs[i] is log p(token_ids[i+1] | token_ids[:i+1]).
    """
    from .checkpoint import load_model_dir, load_tokenizer, read_config
    from .device import resolve_device, resolve_dtype
    from .score import score_text

    read_config(model)  # fail fast on a bad dir before loading anything heavy
    tokenizer = load_tokenizer(model)
    dev = resolve_device(device)
    net = load_model_dir(model, dev, resolve_dtype(dev, dtype))
    result = score_text(net, tokenizer, _read_text_arg(text))
    if as_json:
        typer.echo(json.dumps(result))
        return
    for tid, lp in zip(result["token_ids"][1:], result["logprobs"]):
        typer.echo(f"{lp:10.4f}  {terminal_safe(repr(tokenizer.decode([tid])))}")
    typer.echo(f"perplexity {result['perplexity']:.4f} over {len(result['logprobs'])} tokens")


@app.command(epilog="Examples:\n\n  m3 encode samples/corpus.jsonl -o kb.m3bank --model out/smollm2\n\n"
                    "  cat docs.jsonl | m3 encode - -o kb.m3bank --model out/smollm2 --codec int8")
@user_errors
def encode(
    corpus: Annotated[str, typer.Argument(help="Parquet (column text; optional id, title, source), JSONL with the "
                                               "same fields, or - for JSONL on standard input.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .m3bank file to write.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="m3 model dir that encodes the memories.")],
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Encode a corpus into an .m3bank of sparse explicit memories.

    Documents are cut into references of at most 128 tokens at sentence boundaries; each
    reference's memory is computed by the model and written with its text. The output path never
    holds a half-written bank; a killed run continues with --resume and gives the same bytes.
    """
    from .bank import CODECS
    from .encode import encode_corpus

    if codec not in CODECS:
        raise M3Error(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    try:
        summary = encode_corpus(corpus, model, output, codec=codec, batch_size=batch_size, device=device,
                                dtype=dtype, overwrite=force, resume=resume, show_progress=not quiet,
                                vq_subquantizers=vq_subquantizers)
    except KeyboardInterrupt:
        typer.echo("m3: interrupted; run the same command with --resume to continue from the last checkpoint",
                   err=True)
        raise typer.Exit(130)
    if summary is not None:  # None on the non-main processes of a sharded encode
        typer.echo(f"wrote {summary.path}: {summary.documents} documents, {summary.references} references, "
                   f"{summary.tokens} tokens, codec {summary.codec}, model {summary.fingerprint[:19]}")


@app.command(epilog="Examples:\n\n  m3 inspect memory3-2.4b\n\n  m3 inspect models/smollm2 --json | jq .memory_bytes_bf16\n\n"
                    "  m3 inspect kb.m3bank --verify\n\n  m3 inspect kb.m3bank --ref 3 --model out/smollm2")
@user_errors
def inspect(
    target: Annotated[str, typer.Argument(help="An .m3bank file, an m3 model dir, or a preset name "
                                               "(memory3-2.4b, small, tiny).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ref: Annotated[Optional[int], typer.Option("--ref", help="Bank: show reference N and the tokens kept "
                                                             "per memory layer and KV head.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Bank --ref: model dir whose tokenizer "
                                                                        "turns kept positions into token strings.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Bank: recompute every checksum and check every "
                                                          "record; exit 1 on any problem.")] = False,
) -> None:
    """Describe a bank (counts, model, codec, sections) or a model (parameters, memory geometry)."""
    from .checkpoint import config_summary, read_config
    from .config import PRESETS

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


def print_fields(info: dict) -> None:
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        typer.echo(f"{key:<{width}}  {terminal_safe(str(value))}")


def _not_yet(name: str, issue: int, what: str):
    def stub(ctx: typer.Context) -> None:
        _fail(f"`m3 {name}` is not available yet: {what} lands with issue #{issue}")

    stub.__doc__ = f"(not available yet: issue #{issue}) {what[0].upper()}{what[1:]}."
    app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(stub)


_not_yet("pretrain", 6, "two-stage training (warmup, continual with memory) through accelerate")
_not_yet("index", 4, "building the FAISS retrieval index inside a bank")
_not_yet("generate", 5, "generation that reads explicit memory")


def main() -> None:
    app()
