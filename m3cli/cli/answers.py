"""Commands that answer: generate, eval, bench."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..default_model import resolve_bank, resolve_model
from ..errors import M3Error
from ..output import terminal_safe
from .common import (
    BankOpt,
    DeviceOpt,
    DtypeOpt,
    EmbedderOpt,
    MaxGapOpt,
    MaxNewTokensOpt,
    MaxOverlapOpt,
    MemoriesOpt,
    ModelOpt,
    MAX_NEW_TOKENS,
    MAX_OVERLAP,
    MAX_OVERLAP_QUERY,
    MEMORIES,
    check_batch,
    check_gap,
    check_overlap,
    command,
    open_generator,
    read_text_arg,
    user_errors,
)

PANEL = "Answers"


def _read_prompts(prompt: str | None) -> list[str]:
    """One prompt, or (for - or none) one per line of standard input; JSON lines need a "prompt" field."""
    if prompt is not None and prompt != "-":
        return [prompt]
    if prompt is None and sys.stdin.isatty():
        raise M3Error('no prompt: give one (m3 generate "…") or pipe prompts on standard input, one per line')
    prompts = []
    for n, line in enumerate(read_text_arg("-").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise M3Error(f"standard input line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise M3Error(f'standard input line {n}: a JSON line needs a string field "prompt"')
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
        where = {
            "prompt": f"prompt tokens {rec.tokens[0]}-{rec.tokens[1]}",
            "inherited": f"generated tokens {rec.tokens[0]}-{rec.tokens[1]}, inherits the last prompt chunk's",
            "generated": f"generated tokens {rec.tokens[0]}-{rec.tokens[1]}, retrieved with the generated "
            f"tokens before it",
        }[rec.source]
        echo(f"chunk {rec.chunk} ({where}):")
        if not rec.hits:
            echo("  (no reference)")
        for j, h in enumerate(rec.hits):
            attn = f"  attention {rec.attention[j]:.1%}" if rec.attention is not None else ""
            text = " ".join(h.text.split())
            echo(
                f"  ref {h.ref:<6} score {h.score:.3f}{attn}  {terminal_safe(h.title or h.doc_id)}: "
                f"{terminal_safe(text[:120])}{'…' if len(text) > 120 else ''}"
            )


@command(
    panel=PANEL,
    examples=[
        'm3 generate --bank kb.m3bank "What is the capital of Mali?"',
        'm3 generate --bank kb.m3bank --explain --chat "Who founded Northwind?"',
        'm3 generate --mode none -n 20 "Once upon a time"',
        "cat questions.txt | m3 generate --bank kb.m3bank --json | jq -r .text",
        'm3 generate --model models/smollm2 --bank kb.m3bank --mode rag --memories 2 "Where is Bamako?"',
    ],
)
@user_errors
def generate(
    prompt: Annotated[
        Optional[str],
        typer.Argument(
            help="The prompt. Without it (or with -), prompts come from "
            "standard input: one per line, or JSON lines with a "
            '"prompt" field.'
        ),
    ] = None,
    model: ModelOpt = None,
    bank: BankOpt = None,
    mode: Annotated[
        Optional[str],
        typer.Option(
            help="memory (explicit memory), none (closed book) or rag (the "
            "retrieved references' text in front of the prompt); "
            "default: memory with --bank, else none."
        ),
    ] = None,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    temperature: Annotated[float, typer.Option(help="0 = greedy; higher samples more freely.")] = 0.0,
    top_p: Annotated[
        float,
        typer.Option("--top-p", help="Nucleus sampling: keep the smallest set of tokens holding this probability."),
    ] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens (0 = off).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    chat: Annotated[
        Optional[bool],
        typer.Option(
            "--chat/--no-chat",
            help="Wrap each prompt in the tokenizer's chat template, or not; default: where the model has one.",
            show_default=False,
        ),
    ] = None,
    memories: MemoriesOpt = MEMORIES,
    retrieve_every: Annotated[
        int,
        typer.Option(
            "--retrieve-every", help="While decoding, retrieve new memories after this many generated tokens."
        ),
    ] = 64,
    max_overlap: MaxOverlapOpt = MAX_OVERLAP_QUERY,
    max_gap: MaxGapOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts generated together.")] = 8,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON object per prompt: text, and per chunk the "
            "references read, their scores and attention share.",
        ),
    ] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="After each answer, list the references each chunk read, with titles, text and attention share.",
        ),
    ] = False,
    embedder: EmbedderOpt = None,
    cache_size: Annotated[int, typer.Option("--cache-size", help="Decoded memories kept in the LRU cache.")] = 4096,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate text while the model reads its explicit memories.

    Each 64-token chunk of the prompt retrieves its own memories; while decoding, every 64
    generated tokens retrieve the next chunk's. One prompt streams to standard output; prompts
    from standard input give one line per answer, in order (--json: one JSON object per line).
    """
    bank = resolve_bank(bank)
    from ..generate import Options

    check_overlap(max_overlap)
    mode = mode or ("memory" if bank is not None else "none")
    opts = Options(
        mode=mode,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        memories=memories,
        retrieve_every=retrieve_every,
        max_overlap=max_overlap,
        chat=chat,
        cite=as_json or explain,
        max_gap=max_gap,
    )
    opts.check()
    check_batch(batch_size)
    prompts = _read_prompts(prompt)
    model = resolve_model(model, bank)
    if mode == "none" and bank is not None:
        bank = None  # closed book: the bank is not read (it only named the model)
    with open_generator(model, bank, device, dtype, embedder, cache_size) as (gen, _):
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
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


@command(
    panel=PANEL,
    examples=[
        "m3 bench --model tiny --synthetic-refs 200 --batch-size 1,4 --max-new-tokens 16 --modes none,memory",
        "m3 bench --model models/smollm2 --bank kb.m3bank --prompt-len 32 --max-new-tokens 32 --repeats 1 --json "
        "| jq .ratios",
        "m3 bench --bank kb.m3bank --batch-size 1 --prompt-len 32 --max-new-tokens 16 --repeats 1 --cold",
    ],
)
@user_errors
def bench(
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            "-m",
            help="m3 model dir, or a preset name (random weights, with a synthetic bank: see --synthetic-refs); "
            "default: $M3_MODEL, else the model the bank names, else the default model.",
        ),
    ] = None,
    bank: Annotated[Optional[Path], typer.Option("--bank", "-b", help="An indexed bank encoded by MODEL.")] = None,
    batch: Annotated[str, typer.Option("--batch-size", help="Batch sizes to measure, comma-separated.")] = "1,8",
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens per sequence.")] = 128,
    new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Tokens generated per sequence (no early stop).")
    ] = MAX_NEW_TOKENS,
    modes: Annotated[str, typer.Option(help="Modes to compare, comma-separated.")] = "none,memory,rag",
    memories: MemoriesOpt = MEMORIES,
    repeats: Annotated[int, typer.Option(help="Timed runs per (batch, mode); the median is reported.")] = 3,
    synthetic_refs: Annotated[
        int, typer.Option("--synthetic-refs", help="With a preset: references in the synthetic bank.")
    ] = 10000,
    embedder: Annotated[
        str,
        typer.Option(
            help="With a preset: the query embedder the synthetic bank is "
            "indexed for, minilm, self or a static embedder dir; with --bank "
            "indexed by an encoder or static embedder dir: that dir."
        ),
    ] = "minilm",
    codec: Annotated[str, typer.Option(help="With a preset: the synthetic bank's codec.")] = "bf16",
    text: Annotated[
        str,
        typer.Option(
            help="With a preset: the references' text, wikipedia (the installed "
            "summaries package; pseudo-text if missing) or pseudo."
        ),
    ] = "wikipedia",
    workdir: Annotated[
        Optional[Path],
        typer.Option(help="With a preset: keep the synthetic model and bank here (default: a temporary dir, removed)."),
    ] = None,
    cold: Annotated[
        bool,
        typer.Option(
            "--cold",
            help="Evict the bank file from the OS page cache before every run, so memories are read "
            "from the drive (the paper's worst case; Linux).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"results": [...], "ratios": [...]}.')] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Decode throughput and time to first token of none, memory and rag on the same model, side
    by side in one run.

    Each row is the median of --repeats runs, modes interleaved; each run starts with an empty
    memory cache. Time is broken down into retrieval, memory load, prefill and decode. The ratios
    compare whole calls, the tokens after the first (decode_…: without the prompt's prefill and
    retrieval) and the time to the first token (ttft_…).
    """
    import tempfile

    from ..bank import CODECS
    from ..bench import ratios, run_bench, synthetic_setup
    from ..config import PRESETS
    from ..device import resolve_device

    try:
        batches = [int(b) for b in batch.split(",")]
        mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    except ValueError:
        raise M3Error(f"--batch-size must be comma-separated integers, got {batch!r}") from None
    if not batches or min(batches) < 1:
        raise M3Error("--batch-size values must be at least 1")
    bad = [m for m in mode_list if m not in ("none", "memory", "rag")]
    if bad or not mode_list:
        raise M3Error(f"unknown mode {bad[0] if bad else modes!r}; choose from none, memory, rag")
    if repeats < 1 or prompt_len < 1 or new_tokens < 1 or memories < 1:
        raise M3Error("--repeats, --prompt-len, --max-new-tokens and --memories must be at least 1")
    log = lambda s: typer.echo(s, err=True)  # noqa: E731 (progress and setup notes: stdout carries only results)
    with contextlib.ExitStack() as stack:
        if model is None or (model not in PRESETS and not Path(model).is_dir()):
            from ..default_model import resolve_model

            model = str(resolve_model(model, bank))
        if not Path(model).is_dir() and model in PRESETS:
            if bank is not None:
                raise M3Error("--bank needs a model dir (the model that encoded it), not a preset")
            if codec not in CODECS or codec == "vq":
                raise M3Error("--codec for a synthetic bank: bf16 or int8")
            if synthetic_refs < 1:
                raise M3Error("--synthetic-refs must be at least 1")
            if embedder not in ("minilm", "self") and not (Path(embedder) / "m3-embedder.json").is_file():
                raise M3Error(
                    "--embedder for a synthetic bank: minilm, self or a static embedder dir (m3 distill-embedder)"
                )
            where = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="m3-bench-")))
            where.mkdir(parents=True, exist_ok=True)
            if text not in ("wikipedia", "pseudo"):
                raise M3Error("--text: wikipedia or pseudo")
            model_dir, bank = synthetic_setup(
                model, synthetic_refs, where, embedder, codec=codec, log=log, device=resolve_device(device), text=text
            )
        else:
            model_dir = Path(model)
        encoder = None if embedder in ("minilm", "self") else embedder  # a bank indexed with an encoder dir
        gen, _ = stack.enter_context(open_generator(model_dir, bank, device, dtype, encoder))
        rows = run_bench(gen, batches, prompt_len, new_tokens, mode_list, repeats, memories, log=log, cold=cold)
        summary = ratios(rows)
        info = {
            "model": model,
            "device": str(resolve_device(device)),
            "dtype": str(gen.dtype).removeprefix("torch."),
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "bank_refs": gen.retriever.bank.n_refs if gen.retriever else 0,
            "cold": cold,
        }
        if as_json:
            typer.echo(json.dumps({"setup": info, "results": rows, "ratios": summary}))
            return
        typer.echo(
            "\n| batch | mode | tokens/s | first token s | total s | retrieval s | memory load s | prefill s | decode s |"
        )
        typer.echo("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            typer.echo(
                f"| {r['batch']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['ttft']:.3f} | {r['total_s']:.3f} | "
                f"{r.get('retrieval_s', 0):.3f} | {r.get('memory_load_s', 0):.3f} | {r.get('prefill_s', 0):.3f} | "
                f"{r.get('decode_s', 0):.3f} |"
            )
        for s in summary:
            typer.echo(
                "batch {batch}: ".format(**s)
                + ", ".join(f"{k.replace('_vs_', '/')} {v:.2f}x" for k, v in s.items() if k != "batch")
            )


@command(
    "eval",
    panel=PANEL,
    examples=[
        "m3 eval --bank kb.m3bank --qa qa.jsonl --show 2",
        "m3 eval --model models/smollm2 --bank kb.m3bank --qa qa.jsonl "
        "--modes none,memory,rag --json | jq .memory.accuracy",
    ],
)
@user_errors
def eval_cmd(
    qa: Annotated[
        Path,
        typer.Option(
            "--qa",
            help='JSONL with {"question", "answer"} per line (optional "aliases": other accepted answers; '
            '"title": the document it is about).',
        ),
    ],
    model: ModelOpt = None,
    bank: BankOpt = None,
    text: Annotated[
        Optional[Path], typer.Option("--text", help="Held-out text (Parquet/JSONL corpus) for perplexity per mode.")
    ] = None,
    modes: Annotated[
        Optional[str], typer.Option(help="Comma-separated; default none,memory,rag with --bank, else none.")
    ] = None,
    prompt_template: Annotated[
        str, typer.Option("--prompt-template", help="How a question becomes a prompt.")
    ] = "Question: {question} Answer:",
    chat: Annotated[
        Optional[bool],
        typer.Option(
            "--chat/--no-chat",
            help="Wrap prompts in the tokenizer's chat template, or not; default: where the model has one.",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens", "-n", help="Tokens to generate at most per answer (only its first sentence counts)."
        ),
    ] = 12,
    memories: MemoriesOpt = MEMORIES,
    max_overlap: MaxOverlapOpt = MAX_OVERLAP,
    max_gap: MaxGapOpt = None,
    score_prior: Annotated[
        bool,
        typer.Option(
            "--score-prior/--no-score-prior",
            help="For a model trained with "
            "--memory-score-prior: --no-score-prior hides the retriever's "
            "scores from it, so it reads its memories by content alone (the "
            "paper's Eq. 4), for comparison.",
        ),
    ] = True,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions generated together.")] = 32,
    embedder: EmbedderOpt = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print {mode: {accuracy, n, correct, chance, "
            "perplexity}}; memory also has right_retrieved, "
            "right_first, right_attention(_even) when questions "
            'have a "title".',
        ),
    ] = False,
    show: Annotated[
        int, typer.Option("--show", help="Also print the first N questions with every mode's answer side by side.")
    ] = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
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
    from ..evaluate import evaluate, read_qa

    mode_list = [m.strip() for m in (modes or ("none,memory,rag" if bank else "none")).split(",") if m.strip()]
    bad = [m for m in mode_list if m not in ("none", "memory", "rag")]
    if bad or not mode_list:
        raise M3Error(f"unknown mode {bad[0] if bad else modes!r}; choose from none, memory, rag")
    if bank is None and set(mode_list) - {"none"}:
        raise M3Error("modes memory and rag need --bank")
    if limit is not None and limit < 1:
        raise M3Error("--limit must be at least 1")
    check_batch(batch_size)
    check_gap(max_gap)
    check_overlap(max_overlap)
    if "{question}" not in prompt_template:
        raise M3Error("--prompt-template must contain {question}")
    questions = read_qa(qa, limit)
    model = resolve_model(model, bank)
    texts = None
    if text is not None:
        from ..corpus import read_corpus

        texts = [d.text for d in read_corpus(text) if d.text.strip()]
        if not texts:
            raise M3Error(f"{text} holds no text")
    from ..output import stderr_progress

    with open_generator(model, bank, device, dtype, embedder) as (gen, _), stderr_progress("eval") as bar:
        tasks: dict = {}

        def on_progress(mode: str, done: int, total: int) -> None:
            if mode not in tasks:
                tasks[mode] = bar.add_task(mode, total=total)
            bar.update(tasks[mode], completed=done)

        result = evaluate(
            gen,
            questions,
            mode_list,
            template=prompt_template,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_overlap=max_overlap,
            memories=memories,
            texts=texts,
            chat=chat,
            max_gap=max_gap,
            score_prior=score_prior,
            progress=on_progress,
        )
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
            att = (
                "-"
                if r["right_attention"] is None
                else f"{r['right_attention']:.3f} ({r['right_attention_even']:.3f} if even)"
            )
            typer.echo(
                f"         asked document: retrieved {r['right_retrieved']:.3f}, first {r['right_first']:.3f}, "
                f"memory attention {att}"
            )
    from ..evaluate import first_sentence, is_correct

    for j, q in enumerate(questions[: max(0, show)]):
        typer.echo(f"\n{terminal_safe(q['question'])}  (answer: {terminal_safe(q['answer'])})")
        for m in mode_list:
            mark = "right" if is_correct(q["answer"], answers[m][j], q.get("aliases", ())) else "wrong"
            typer.echo(f"  {m:6s} {mark}  {terminal_safe(first_sentence(answers[m][j]).strip())!r}")
