"""Commands about models: convert, inspect, score."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..default_model import resolve_bank, resolve_model
from ..errors import M3Error
from ..output import print_fields, terminal_safe
from .common import (
    BankOpt,
    DeviceOpt,
    DtypeOpt,
    EmbedderOpt,
    MaxGapOpt,
    MaxOverlapOpt,
    MemoriesOpt,
    ModelOpt,
    MAX_OVERLAP,
    MEMORIES,
    check_gap,
    check_overlap,
    command,
    echo_json,
    open_generator,
    read_text_arg,
    user_errors,
)

PANEL = "Models"


@command(
    panel=PANEL,
    examples=[
        "m3 convert ./SmolLM2-135M-Instruct -o models/smollm2",
        "m3 convert ./SmolLM2-135M-Instruct -o models/smollm2-bf16 --dtype bfloat16 --json | jq .parameters",
    ],
)
@user_errors
def convert(
    src: Annotated[
        Path,
        typer.Argument(
            help="Hugging Face checkpoint dir (Llama, Qwen2, Mistral, SmolLM), "
            "a GGUF file, or a dir holding one GGUF file."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The m3 model dir to create.")],
    dtype: Annotated[
        str, typer.Option(help="Weight dtype to store: auto (as the source), float32, bfloat16, float16.")
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print {output, layers, parameters, memory_layers, reference_prefix_ids, fingerprint} as JSON.",
        ),
    ] = False,
) -> None:
    """Import a local Hugging Face or GGUF checkpoint into an m3 model dir (safetensors, no pickle).

    A GGUF file (or a dir holding one, like the packaged SmolLM2-135M-Instruct) converts the same way.
    """
    from ..checkpoint import config_summary, model_fingerprint
    from ..convert import convert as run

    cfg = run(src, output, dtype=dtype, overwrite=force)
    info = config_summary(cfg)
    if as_json:
        echo_json(
            {
                "output": str(output),
                "layers": cfg.n_layers,
                "parameters": info["parameters"],
                "memory_layers": list(cfg.mem_layers),
                "reference_prefix_ids": list(cfg.reference_prefix_ids),
                "fingerprint": model_fingerprint(output),
            }
        )
        return
    typer.echo(
        f"wrote {output}: {cfg.n_layers} layers, {info['parameters']:,} parameters, "
        f"memory layers {list(cfg.mem_layers)}, reference prefix ids {list(cfg.reference_prefix_ids)}"
    )


@command(
    panel=PANEL,
    examples=[
        "m3 inspect",
        "m3 inspect --json | jq -r .default_model",
        "m3 inspect memory3-2.4b",
        "m3 inspect models/smollm2 --json | jq .memory_bytes_bf16",
        "m3 inspect kb.m3bank --verify",
        "m3 inspect kb.m3bank --ref 3 --model models/smollm2",
    ],
)
@user_errors
def inspect(
    target: Annotated[
        Optional[str],
        typer.Argument(
            help="An .m3bank file, an m3 model dir, or a preset name "
            "(memory3-2.4b, small, mini, tiny); none: the "
            "environment (default model, cache, device, versions)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ref: Annotated[
        Optional[int],
        typer.Option("--ref", help="Bank: show reference N and the tokens kept per memory layer and KV head."),
    ] = None,
    model: Annotated[
        Optional[Path],
        typer.Option(
            "--model",
            "-m",
            help="Bank --ref: model dir whose tokenizer "
            "turns kept positions into token strings; "
            "--verify: the model to check the bank "
            "against (default: $M3_MODEL, else the "
            "model the bank names, if it is "
            "here).",
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Bank: recompute every checksum, check every record and "
            "value, load the index, and check the bank fits its "
            "model; exit 1 on any problem.",
        ),
    ] = False,
) -> None:
    """Describe a bank (counts, model, embedder, index, sections), a model (parameters, memory
    geometry), or with no target what commands fall back on: the model, bank and embedder they
    use without flags, the cache dir, the device and versions."""
    from ..checkpoint import config_summary, read_config
    from ..config import PRESETS

    if target is None:
        if ref is not None or verify or model is not None:
            raise M3Error("--ref, --verify and --model need a bank: m3 inspect BANK …")
        from ..default_model import environment

        info = environment()
        if as_json:
            typer.echo(json.dumps(info))
            return
        versions = info.pop("versions")
        print_fields({**info, "versions": " ".join(f"{k} {v}" for k, v in versions.items())})
        return
    path = Path(target)
    if path.is_file() or (path / "manifest.json").is_file():  # a bank, or a bank set's directory
        from ..inspect_bank import inspect_bank

        inspect_bank(path, as_json=as_json, ref=ref, model_dir=model, verify=verify, echo=typer.echo)
        return
    if ref is not None or verify:
        raise M3Error("--ref and --verify apply to banks (.m3bank files and .m3set bank sets)")
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


@command(
    panel=PANEL,
    examples=[
        'm3 score --model models/smollm2 "The capital of France is Paris."',
        "cat doc.txt | m3 score --json - | jq .perplexity",
        'm3 score --bank kb.m3bank --mode memory "Paris is the capital of France."',
    ],
)
@user_errors
def score(
    text: Annotated[str, typer.Argument(help="The text to score, or - to read it from standard input.")],
    model: ModelOpt = None,
    bank: BankOpt = None,
    mode: Annotated[
        Optional[str],
        typer.Option(
            help="none (closed book), memory (each 64-token chunk reads "
            "its own memories) or rag (references in front); "
            "default: memory with --bank, else none."
        ),
    ] = None,
    memories: MemoriesOpt = MEMORIES,
    max_overlap: MaxOverlapOpt = MAX_OVERLAP,
    max_gap: MaxGapOpt = None,
    embedder: EmbedderOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {token_ids, logprobs, perplexity, mode, chunks} as JSON.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Per-token log-probabilities and perplexity of a text, closed book or with memory.

    logprobs[i] is log p(token_ids[i+1] | token_ids[:i+1]); every mode scores the same tokens,
    so perplexities compare across modes.
    """
    bank = resolve_bank(bank)
    from ..score import score_text

    check_gap(max_gap)
    check_overlap(max_overlap)
    mode = mode or ("memory" if bank is not None else "none")
    body = read_text_arg(text)
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise M3Error("the text is not valid UTF-8") from None
    model = resolve_model(model, bank)
    if mode == "none" and bank is None:
        from ..checkpoint import open_model
        from ..device import resolve_device, resolve_dtype

        dev = resolve_device(device)
        loaded = open_model(model, dev, resolve_dtype(dev, dtype))
        tokenizer = loaded.tokenizer
        result = {**score_text(loaded.model, tokenizer, body), "mode": "none", "chunks": []}
    else:
        from ..generate import Options

        with open_generator(model, bank, device, dtype, embedder) as (gen, tokenizer):
            result = gen.score(body, Options(mode=mode, memories=memories, max_overlap=max_overlap, max_gap=max_gap))
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    for tid, lp in zip(result["token_ids"][1:], result["logprobs"]):
        typer.echo(f"{lp:10.4f}  {terminal_safe(repr(tokenizer.decode([tid])))}")
    typer.echo(f"perplexity {result['perplexity']:.4f} over {len(result['logprobs'])} tokens (mode {result['mode']})")
