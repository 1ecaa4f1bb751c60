"""Commands that make models and their data: synth, pretrain (with recipes)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import M3Error
from .common import MAX_OVERLAP, MEMORIES, click, command, echo_json, output_path, user_errors, warn

PANEL = "Training"


@command(
    panel=PANEL,
    examples=[
        "m3 synth -o out/synth --people 400 --seed 0",
        "m3 synth -o out/synth --people 400 --force && head -2 out/synth/qa_unseen.jsonl",
    ],
)
@user_errors
def synth(
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Directory to create with train.parquet, kb.parquet, qa_seen.jsonl, qa_unseen.jsonl and synth.json.",
        ),
    ] = None,
    old_out_dir: Annotated[Optional[Path], typer.Argument(hidden=True, metavar="[OUT_DIR]")] = None,
    people: Annotated[
        int, typer.Option(help="Invented people; 10% (at most 500) are unseen: their facts are only in kb.parquet.")
    ] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same files.")] = 0,
    namesake_pairs: Annotated[
        int,
        typer.Option(
            "--namesake-pairs",
            help="Add N training documents of one "
            "question-answer line about each of two seen namesakes (only "
            "the names tell whose memory answers). The other files do not "
            "change.",
        ),
    ] = 0,
    qa_only: Annotated[
        bool,
        typer.Option(
            "--qa-only",
            help="Leave each seen person's biography (with its two "
            "question-answer lines) out of train.parquet; the three-question "
            "documents stay, so until a model has seen them their answers are "
            "only in kb.parquet. The other files do not change.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if m3 synth wrote it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts written as JSON.")] = False,
) -> None:
    """Write a deterministic synthetic knowledge task: invented people with attributes.

    train.parquet talks about the seen people (biographies and question-answer lines);
    kb.parquet holds differently worded biographies of seen and unseen people; the questions
    about unseen people can only be answered from the bank.
    """
    from ..synth import synthesize

    out_dir = output_path(output, old_out_dir, "synth")
    info = synthesize(out_dir, n_people=people, seed=seed, overwrite=force, n_pairs=namesake_pairs, qa_only=qa_only)
    if as_json:
        echo_json({"output": str(out_dir), **info})
        return
    typer.echo(
        f"wrote {out_dir}: {info['train_texts']} training texts about {info['seen']} seen people, "
        f"{info['kb_texts']} kb texts, {info['qa_seen']} + {info['qa_unseen']} questions (seen + unseen)"
    )


# --- recipes ----------------------------------------------------------------------------------
def read_recipe(path: Path, command: click.Command) -> dict[str, Any]:
    """A recipe: a TOML table of `m3 pretrain` settings, named as the options are (`batch-size` or
    `batch_size`, `compile`, `json`), plus `corpus`. Flags on the command line override it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise M3Error(f"cannot read the recipe {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise M3Error(f"{path} is not valid TOML: {e}") from None
    data.pop("description", None)
    names: dict[str, click.Parameter] = {}
    for p in command.params:
        if p.name in ("config", "help"):
            continue
        names[str(p.name)] = p  # `corpus`, and the option's own name
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = p
    out: dict[str, Any] = {}
    for key, value in data.items():
        param = names.get(str(key).replace("-", "_"))
        if param is None:
            known = ", ".join(sorted(n.replace("_", "-") for n in names if n != "as_json" and n != "compile_model"))
            raise M3Error(f"{path}: unknown setting {key!r}; a recipe sets m3 pretrain's options: {known}")
        flag = bool(getattr(param, "is_flag", False))
        if isinstance(value, (dict, list)) or isinstance(value, bool) != flag:
            what = "true or false" if flag else "a number or a string"
            raise M3Error(f"{path}: {key} = {value!r}; it takes {what}")
        out[str(param.name)] = value
    return out


def _load_config(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """--config: a recipe file, read before the other options so that they override it. A preset
    name here is the old spelling of --preset (one more release)."""
    if value is None or ctx.resilient_parsing:
        return value
    from ..config import PRESETS

    if value in PRESETS and not Path(value).is_file():
        warn(f"--config {value} is deprecated for a preset; use --preset {value} (the old form goes in m3 0.3)")
        ctx.meta["m3.preset"] = value
        return value
    settings = read_recipe(Path(value), ctx.command)  # a bad recipe is bad input: one line, exit 1
    ctx.default_map = {**(ctx.default_map or {}), **settings}
    return value


DATA, MODEL, MEMORY, OPTIM, RUN = "Data and output", "Model", "Memory", "Optimisation", "Run"


@command(
    panel=PANEL,
    examples=[
        "m3 pretrain --config recipes/proof-warmup.toml out/synth/train.parquet -o models/warm --steps 20",
        "m3 pretrain corpus.parquet -o models/warm2 --preset tiny --stage warmup --steps 10 --json | jq .final_loss",
        "m3 pretrain corpus.parquet -o models/reader --stage continual --init-from models/smollm2 --bank kb.m3bank "
        "--train reader --steps 4 --save-every 2",
    ],
)
@user_errors
def pretrain(
    corpus: Annotated[
        str,
        typer.Argument(
            help="Training text: Parquet or JSONL with a text column (or `corpus` in the recipe).", rich_help_panel=DATA
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The model dir to write at the end.", rich_help_panel=DATA)
    ],
    # model
    stage: Annotated[
        str,
        typer.Option(
            help="warmup (plain LM training) or continual (each chunk reads "
            "memories of retrieved references, encoded in real time).",
            rich_help_panel=MODEL,
        ),
    ] = "warmup",
    preset: Annotated[
        Optional[str],
        typer.Option(
            "--preset",
            help="Train from scratch with this preset's shape "
            "(a BPE tokenizer is trained on the corpus); see m3 inspect "
            "PRESET.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    init_from: Annotated[
        Optional[Path],
        typer.Option(
            "--init-from",
            help="Start from this model dir (e.g. a converted Hugging Face model, or the warmup stage).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    train: Annotated[
        str,
        typer.Option(
            "--train",
            help="all; memory-attention (only the memory layers' "
            "attention); or reader (continual, --init-from: only a "
            "memory reader trains, the model stays frozen and reads "
            "as before without memory).",
            rich_help_panel=MODEL,
        ),
    ] = "all",
    reader_rank: Annotated[
        int,
        typer.Option(
            "--reader-rank",
            help="--train reader: rank of the memory reader's query and output deltas.",
            rich_help_panel=MODEL,
        ),
    ] = 16,
    init_reader: Annotated[
        Optional[Path],
        typer.Option(
            "--init-reader",
            help="--train reader: go on training this reader file (trained on --init-from's weights) "
            "instead of a new one; it sets the memory layers, tokens and rank.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    vocab_size: Annotated[
        Optional[int],
        typer.Option(
            "--vocab-size", help="From scratch: BPE vocabulary (default: the preset's).", rich_help_panel=MODEL
        ),
    ] = None,
    tokenizer: Annotated[
        Optional[Path],
        typer.Option(
            help="From scratch: use this model dir's tokenizer instead of training one.", rich_help_panel=MODEL
        ),
    ] = None,
    # data
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.", rich_help_panel=DATA)] = 256,
    align_docs: Annotated[
        bool,
        typer.Option(
            "--align-docs",
            help="Start every document at a 64-token chunk "
            "boundary (padding gets no loss), so each chunk's retrieval "
            "query is about one document.",
            rich_help_panel=DATA,
        ),
    ] = False,
    # memory
    bank: Annotated[
        Optional[Path],
        typer.Option(
            "--bank",
            "-b",
            help="continual: an indexed bank whose references the chunks retrieve (only its text and index are used).",
            rich_help_panel=MEMORY,
        ),
    ] = None,
    memories: Annotated[
        int,
        typer.Option(
            "--memories",
            help="continual: references each chunk retrieves and reads "
            "(1 = the paper's training; 5 = what inference reads, near misses "
            "included).",
            rich_help_panel=MEMORY,
        ),
    ] = MEMORIES,
    max_overlap: Annotated[
        float,
        typer.Option(
            "--max-overlap",
            help="continual: drop references that overlap the chunk's text by more than this (paper Eq. 6).",
            rich_help_panel=MEMORY,
        ),
    ] = MAX_OVERLAP,
    distractors: Annotated[
        str,
        typer.Option(
            "--distractors",
            help="continual, with --memories K > 1: retrieved "
            "(the chunk's own top-K) or title (its top-1, plus the K-1 references "
            "retrieved with that reference's title: the namesakes a question "
            "about it meets at inference).",
            rich_help_panel=MEMORY,
        ),
    ] = "retrieved",
    prev_chunks: Annotated[
        Optional[int],
        typer.Option(
            "--prev-chunks",
            help="continual: a chunk also reads "
            "the memories of the N chunks before it (default: the "
            "model's train_prev_chunks, 4; saved in the new model).",
            rich_help_panel=MEMORY,
        ),
    ] = None,
    memory_score_prior: Annotated[
        bool,
        typer.Option(
            "--memory-score-prior",
            help="Give the model the "
            "retriever-score prior (not in the paper): each memory's "
            "attention logits get a learned gain times how far its "
            "retriever score falls below its chunk's best; the gains "
            "start at 0 (the model reads as before) and are saved.",
            rich_help_panel=MEMORY,
        ),
    ] = False,
    memory_selection: Annotated[
        Optional[str],
        typer.Option(
            "--memory-selection",
            help="Token score for keeping "
            "memory tokens: attention (the paper) or "
            "attention_x_value_norm (discounts attention sinks).",
            rich_help_panel=MEMORY,
        ),
    ] = None,
    memory_top_k: Annotated[
        Optional[int],
        typer.Option(
            "--memory-top-k",
            help="Tokens kept per memory layer and KV head (default: the model's).",
            rich_help_panel=MEMORY,
        ),
    ] = None,
    memory_layers: Annotated[
        Optional[str],
        typer.Option(
            "--memory-layers",
            help="Layers that read memory: first-half (the paper), all, or indices like 0,1,2 (default: the model's).",
            rich_help_panel=MEMORY,
        ),
    ] = None,
    detach_memory: Annotated[
        bool,
        typer.Option(
            "--detach-memory", help="continual: no gradient through the memory encoding.", rich_help_panel=MEMORY
        ),
    ] = False,
    embedder: Annotated[
        Optional[str],
        typer.Option(
            help="continual: the encoder or static embedder dir the bank was indexed with (minilm and self need none).",
            rich_help_panel=MEMORY,
        ),
    ] = None,
    # optimisation
    steps: Annotated[int, typer.Option(help="Optimizer steps.", rich_help_panel=OPTIM)] = 1000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Sequences per step (per process).", rich_help_panel=OPTIM)
    ] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).", rich_help_panel=OPTIM)] = 1e-3,
    schedule: Annotated[
        str, typer.Option(help="wsd (warmup-stable-decay), cosine or constant.", rich_help_panel=OPTIM)
    ] = "wsd",
    warmup_steps: Annotated[
        int, typer.Option("--warmup-steps", help="Linear learning-rate warmup steps.", rich_help_panel=OPTIM)
    ] = 50,
    min_lr_ratio: Annotated[
        float, typer.Option("--min-lr-ratio", help="Final learning rate / peak.", rich_help_panel=OPTIM)
    ] = 0.1,
    weight_decay: Annotated[
        float,
        typer.Option(
            "--weight-decay",
            help="AdamW weight decay (not on norms, biases and the prior's gains).",
            rich_help_panel=OPTIM,
        ),
    ] = 0.1,
    compile_model: Annotated[
        bool,
        typer.Option(
            "--compile", help="--train reader: torch.compile the model (pays on a GPU).", rich_help_panel=OPTIM
        ),
    ] = False,
    # run
    config: Annotated[
        Optional[str],
        typer.Option(
            "--config",
            help="A recipe: TOML of these options (see recipes/); flags given here override it.",
            is_eager=True,
            callback=_load_config,
            rich_help_panel=RUN,
        ),
    ] = None,
    max_time: Annotated[
        float,
        typer.Option(
            "--max-time",
            help="--train reader: stop after this many seconds "
            "of training, at a checkpoint (0: no limit); --resume continues.",
            rich_help_panel=RUN,
        ),
    ] = 0.0,
    profile: Annotated[
        int,
        typer.Option(
            "--profile",
            help="--train reader: profile N steps (after the first 5) with torch.profiler; "
            "the table of where the time goes is written to OUTPUT.train/profile.txt.",
            rich_help_panel=RUN,
        ),
    ] = 0,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Checkpoint every N steps.", rich_help_panel=RUN)
    ] = 200,
    log_every: Annotated[
        int, typer.Option("--log-every", help="Write metrics every N steps.", rich_help_panel=RUN)
    ] = 10,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.", rich_help_panel=RUN)] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run from its last checkpoint.", rich_help_panel=RUN)
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.", rich_help_panel=RUN)] = False,
    device: Annotated[
        str,
        typer.Option("--device", help="auto, cpu, cuda or cuda:N (bf16 mixed precision on CUDA).", rich_help_panel=RUN),
    ] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=RUN)] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the run's summary (loss, tokens/s, MFU, output, fingerprints) as JSON.",
            rich_help_panel=RUN,
        ),
    ] = False,
) -> None:
    """Train a Memory3 model: warmup (no memory), then continual training with explicit memory.

    Checkpoints, metrics.jsonl (loss, learning rate, tokens/s per --log-every steps) and the
    chunks' retrievals live in OUTPUT.train/; a killed run continues with --resume and ends
    with the same weights. When the weights change, banks encoded by the old model must be
    re-encoded (their fingerprint no longer matches). Recipes in recipes/ hold the settings of
    the recorded runs (make proof, the memory reader).
    """
    from ..train import TrainArgs
    from ..train import pretrain as run

    ctx = click.get_current_context()
    preset = preset or ctx.meta.get("m3.preset")
    args = TrainArgs(
        stage=stage,
        corpus=corpus,
        output=output,
        config=preset,
        init_from=init_from,
        bank=bank,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        min_lr_ratio=min_lr_ratio,
        schedule=schedule,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        save_every=save_every,
        log_every=log_every,
        seed=seed,
        detach_memory=detach_memory,
        train=train,
        device=device,
        memory_selection=memory_selection,
        memory_top_k=memory_top_k,
        memory_layers=memory_layers,
        refs_per_chunk=memories,
        max_overlap=max_overlap,
        prev_chunks=prev_chunks,
        align_docs=align_docs,
        distractors=distractors,
        embedder=embedder,
        score_prior=memory_score_prior,
        reader_rank=reader_rank,
        init_reader=init_reader,
        compile=compile_model,
        max_time=max_time,
        profile=profile,
    )
    if not 0.0 <= max_overlap <= 1.0:
        raise M3Error("--max-overlap must be in [0, 1] (1 keeps every reference)")
    if preset is not None:
        from ..config import PRESETS

        if preset not in PRESETS:
            raise M3Error(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    from ..atomic import output_lock

    try:
        with output_lock(output) if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else contextlib.nullcontext():
            summary = run(
                args, resume=resume, force=force, show_progress=not quiet, log=lambda m: typer.echo(m, err=True)
            )
    except KeyboardInterrupt:
        typer.echo("m3: interrupted; run the same command with --resume to continue from the last checkpoint", err=True)
        raise typer.Exit(130)
    if as_json and ("fingerprint" in summary or summary.get("stopped_at") is not None):
        echo_json(summary)
        return
    if summary.get("stopped_at") is not None:
        typer.echo(
            f"stopped at step {summary['stopped_at']} of {summary['steps']} (--max-time), checkpoint in "
            f"{summary['state_dir']}; run the same command with --resume to continue"
            + (f" (the memory reader so far: {summary['reader']})" if summary.get("reader") else "")
        )
        return
    if "fingerprint" not in summary:
        return  # not the main process
    mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
    typer.echo(
        f"wrote {summary['output']}: {summary['stage']} stage, {summary['steps']} steps, final loss "
        f"{summary['final_loss']:.4f}, {summary['tokens_per_s']:.0f} tokens/s{mfu}, "
        f"{summary['mean_step_s']:.3f} s/step; metrics in {summary['state_dir']}/metrics.jsonl"
    )
    if summary.get("reader"):
        typer.echo(f"the memory reader alone ({summary['reader_parameters']:,} parameters): {summary['reader']}")
    if summary.get("previous_fingerprint"):
        typer.echo(
            f"the weights changed ({summary['previous_fingerprint'][:19]}… -> {summary['fingerprint'][:19]}…): "
            f"banks encoded by {init_from} must be re-encoded with {output}"
        )
