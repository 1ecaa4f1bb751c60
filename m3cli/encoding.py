"""Corpus -> .m3bank: cut documents into references, encode their sparse memories in batches
with the model, stream them into a BankWriter.

Knows the pipeline; the byte layout is bank.py's, reading corpora is corpus.py's, the math is
model.py's. Memory use is bounded by the batch, not the corpus.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .bank import Bank
from .bank_writer import BankWriter, merge_interleaved
from .checkpoint import has_tokenizer, load_model_dir, load_tokenizer, model_fingerprint, read_config
from .corpus import MAX_DOC_BYTES, corpus_files, corpus_kind, iter_references, read_corpus
from .device import resolve_device, resolve_dtype
from .bankset import is_set_path
from .errors import MAX_BATCH, M3Error


MID_DOC_REFS = 256  # references of one document queued before they are encoded without waiting for its end

# how often a running encode makes its progress durable for --resume (M3_CHECKPOINT_SECONDS overrides)
CHECKPOINT_SECONDS = float(os.environ.get("M3_CHECKPOINT_SECONDS", "2.0"))


@dataclass
class EncodeSummary:
    path: Path
    documents: int
    references: int
    tokens: int
    codec: str
    fingerprint: str

    def to_json(self) -> dict:
        """What `m3 encode --json` prints (index: filled in by whoever indexes the bank)."""
        return {
            "output": str(self.path),
            "documents": self.documents,
            "references": self.references,
            "tokens": self.tokens,
            "codec": self.codec,
            "fingerprint": self.fingerprint,
            "index": None,
        }


def bank_header(cfg, fingerprint: str, model_hint: str | None = None) -> dict:
    """The model-describing part of a bank header (format_spec.md, "Header")."""
    hint = {"m3.model.hint": model_hint} if model_hint else {}
    return {
        **hint,
        "m3.memory.layers": cfg.n_mem_layers,
        "m3.memory.layer_ids": list(cfg.mem_layers),
        "m3.memory.kv_heads": cfg.n_kv_heads,
        "m3.memory.top_k": cfg.memory_top_k,
        "m3.memory.head_dim": cfg.head_dim,
        "m3.memory.reference_length": cfg.reference_length,
        "m3.model.fingerprint": fingerprint,
        "m3.model.name": cfg.name,
        "m3.model.reference_prefix": cfg.reference_prefix,
        "m3.model.reference_prefix_ids": list(cfg.reference_prefix_ids),
        "m3.model.rope_theta": cfg.rope_theta,
        "m3.encode.producer": f"m3 {__version__}",
    }


def _count_documents(corpus: str) -> int | None:
    """Cheap total for the progress bar (rows, lines or files); None for stdin and CSV."""
    if corpus == "-":
        return None
    path = Path(corpus)
    try:
        kind = corpus_kind(path)
        if kind == "directory":
            return len(corpus_files(path))
        if kind == "text":
            return 1
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if kind == "jsonl":
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
    except Exception:  # the real reader reports the problem properly
        return None
    return None


@torch.inference_mode()
def _encode_batch(model, refs: list[list[int]]):
    device = model.embed.weight.device
    n = max(len(r) for r in refs)
    ids = torch.zeros(len(refs), n, dtype=torch.long, device=device)
    for i, r in enumerate(refs):
        ids[i, : len(r)] = torch.tensor(r, device=device)
    lengths = torch.tensor([len(r) for r in refs], device=device)
    enc = model.encode_references(ids, lengths)
    return enc.kv.float().cpu(), enc.positions.cpu()


def _corpus_identity(corpus: str) -> dict:
    if corpus == "-":
        return {"corpus": "-"}
    path = Path(corpus)
    if path.is_dir():  # every file read, with its size and time
        files = [(f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in corpus_files(path)]
        return {"corpus": str(path.resolve()), "files": files}
    st = path.stat()
    return {"corpus": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def distributed_state():
    """accelerate's process state when launched with several processes (accelerate launch,
    torchrun), else None. On a machine without CUDA the processes form a CPU (gloo) group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank:05d}-of-{world:05d}")


def encode_corpus(
    corpus: str,
    model_dir: Path,
    out: Path,
    codec: str = "bf16",
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
    vq_subquantizers: int | None = None,
    model_hint: str | None = None,
    max_doc_bytes: int = MAX_DOC_BYTES,
) -> EncodeSummary | None:
    """Encode `corpus` into the bank `out`. With `resume`, an interrupted run of the same
    command continues from its last checkpoint and gives the same bytes.

    Launched as several processes (`accelerate launch`), rank r encodes documents r, r+W, …
    into a part bank; rank 0 then merges the parts into `out` in corpus order and returns the
    summary (other ranks return None). `model_hint` (`default` or the model dir's path) goes into
    the header so that later commands find the model from the bank alone. The writer locks the
    output (`m3 encode` locks it from its start, index included).
    """
    out = Path(out)
    if not 1 <= batch_size <= MAX_BATCH:
        raise M3Error(f"--batch-size must be in 1..{MAX_BATCH}")
    cfg = read_config(model_dir)
    if not has_tokenizer(model_dir):
        raise M3Error(f"{model_dir} has no tokenizer files: cannot cut a corpus into references")
    if not cfg.reference_prefix_ids:
        raise M3Error(f"{model_dir} has no reference prefix ids in its config; re-create it with `m3 convert`")
    if str(corpus) != "-" and not Path(corpus).exists():
        raise M3Error(f"corpus {corpus} does not exist")
    if out.exists() and not overwrite and not (is_set_path(out) and not (out / "manifest.json").exists()):
        raise M3Error(f"{out} already exists; pass --force to replace it")  # (a set's dir alone is resumed)
    state = distributed_state()
    world, rank = (state.num_processes, state.process_index) if state else (1, 0)
    if world > 1 and str(corpus) == "-":
        raise M3Error("a sharded encode needs a corpus file (every process reads it); stdin cannot be shared")
    if resume and str(corpus) == "-":
        raise M3Error("--resume needs a corpus file: standard input cannot be checked to be the same stream")
    tokenizer = load_tokenizer(model_dir)
    documents = read_corpus(corpus, stream=True, max_doc_bytes=max_doc_bytes)
    first = next(documents, None)  # surface an unreadable corpus before loading the model
    documents = itertools.chain([first] if first is not None else [], documents)
    dev = state.device if state else resolve_device(device)
    torch_dtype = resolve_dtype(dev, dtype)
    model = load_model_dir(model_dir, dev, torch_dtype, cfg=cfg)
    fingerprint = model_fingerprint(model_dir, cfg)
    header = bank_header(cfg, fingerprint, model_hint)
    if codec == "vq":
        from .bank import record_bytes
        from .vq import default_subquantizers

        vq_subquantizers = vq_subquantizers or default_subquantizers(cfg.head_dim)
        record_bytes("vq", cfg.memory_shape, vq_subquantizers)  # a bad --vq-subquantizers fails before encoding
    codec_args = {"vq_subquantizers": vq_subquantizers, "device": dev}
    if is_set_path(out):  # a bank set: every process writes its own shard, the main one the manifest
        return _encode_set(
            documents,
            corpus,
            out,
            model,
            tokenizer,
            cfg,
            header,
            codec,
            batch_size,
            overwrite,
            resume,
            {"batch_size": batch_size, "device": dev.type, "dtype": str(torch_dtype)},
            show_progress,
            state,
            codec_args,
            fingerprint,
        )
    if world == 1:
        n_docs, n_refs, n_tokens = _write_bank(
            documents,
            out,
            model,
            tokenizer,
            cfg,
            header,
            codec,
            batch_size,
            _count_documents(str(corpus)),
            overwrite,
            resume,
            {**_corpus_identity(str(corpus)), "batch_size": batch_size, "device": dev.type, "dtype": str(torch_dtype)},
            show_progress,
            empty_error=f"corpus {corpus} holds no text to encode",
            codec_args=codec_args,
        )
        return EncodeSummary(out, n_docs, n_refs, n_tokens, codec, fingerprint)

    parts = [part_path(out, r, world) for r in range(world)]
    mine = parts[rank]
    part_codec = "bf16" if codec == "vq" else codec  # vq codebooks are trained once, on the merge
    key = {
        **_corpus_identity(str(corpus)),
        "batch_size": batch_size,
        "rank": rank,
        "world": world,
        "device": dev.type,
        "dtype": str(torch_dtype),
        "header": header,
        "codec": part_codec,
    }
    key_file = mine.with_name(mine.name + ".key.json")
    finished = resume and mine.exists() and key_file.exists() and json.loads(key_file.read_text()) == key
    if not finished:  # a finished part of the same run is kept by --resume
        key_file.unlink(missing_ok=True)
        total = _count_documents(str(corpus))
        share = None if total is None else len(range(rank, total, world))
        _write_bank(
            (d for i, d in enumerate(documents) if i % world == rank),
            mine,
            model,
            tokenizer,
            cfg,
            header,
            part_codec,
            batch_size,
            share,
            True,
            resume,
            key,
            show_progress and state.is_main_process,
        )
        key_file.write_text(json.dumps(key))
    state.wait_for_everyone()
    summary = None
    if state.is_main_process:
        n_refs = 0
        for p in parts:
            with Bank(p) as part:
                n_refs += part.n_refs
        if n_refs:  # an empty corpus must not replace an existing bank
            merge_interleaved(parts, out, overwrite=overwrite, codec=codec, **codec_args)
            with Bank(out) as bank:
                summary = EncodeSummary(
                    out, bank.n_docs, bank.n_refs, bank.header["m3.bank.tokens"], codec, fingerprint
                )
        for p in parts:
            p.unlink()
            p.with_name(p.name + ".key.json").unlink(missing_ok=True)
    state.wait_for_everyone()
    if state.is_main_process and summary is None:
        raise M3Error(f"corpus {corpus} holds no text to encode")
    return summary


def _encode_set(
    documents,
    corpus,
    out,
    model,
    tokenizer,
    cfg,
    header,
    codec,
    batch_size,
    overwrite,
    resume,
    settings,
    show_progress,
    state,
    codec_args,
    fingerprint,
) -> EncodeSummary | None:
    """Encode into the bank set `out` (a directory): rank r of W writes the documents r, r+W, …
    into its shard (resumable, like any bank; a finished shard of the same run is kept by
    --resume), then the main process writes the manifest, holding the set's lock. A re-encode
    (--force) writes shards under new names and the old set stays whole until the new manifest
    replaces it. Nothing is merged: each shard keeps its own memories (and, for vq, codebooks)."""
    import contextlib

    from .atomic import output_lock
    from .bankset import MANIFEST, generation, shard_name, write_manifest

    world, rank = (state.num_processes, state.process_index) if state else (1, 0)
    main = state is None or state.is_main_process
    if out.exists() and not out.is_dir():
        raise M3Error(f"{out} exists and is not a bank-set directory")
    if (out / MANIFEST).exists() and not overwrite:
        raise M3Error(f"{out} already exists; pass --force to replace it")
    gen = generation(out)  # every process reads the same manifest: nothing is written before the barrier
    if state is not None:
        state.wait_for_everyone()
    with output_lock(out) if main else contextlib.nullcontext():
        out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            state.wait_for_everyone()
        shard = out / shard_name(rank, world, gen)
        key = {**_corpus_identity(str(corpus)), **settings, "rank": rank, "world": world, "header": header}
        key_file = shard.with_name(shard.name + ".key.json")
        finished = resume and shard.exists() and key_file.exists() and json.loads(key_file.read_text()) == key
        if not finished:
            key_file.unlink(missing_ok=True)
            total = _count_documents(str(corpus))
            share = None if total is None else len(range(rank, total, world))
            _write_bank(
                (d for i, d in enumerate(documents) if i % world == rank),
                shard,
                model,
                tokenizer,
                cfg,
                header,
                codec,
                batch_size,
                share,
                overwrite,
                resume,
                key,
                show_progress and main,
                codec_args=codec_args,
            )
            key_file.write_text(json.dumps(key))
        if state is not None:
            state.wait_for_everyone()
        if not main:
            return None
        shards = [out / shard_name(r, world, gen) for r in range(world)]
        write_manifest(out, shards, generation=gen)  # a shard whose share held no text is left out
    from .bank import Bank

    with Bank(out) as bset:
        return EncodeSummary(out, bset.n_docs, bset.n_refs, bset.header["m3.bank.tokens"], codec, fingerprint)


def _write_bank(
    documents,
    out: Path,
    model,
    tokenizer,
    cfg,
    header: dict,
    codec: str,
    batch_size: int,
    total: int | None,
    overwrite: bool,
    resume: bool,
    resume_key: dict,
    show_progress: bool,
    empty_error: str | None = None,
    codec_args: dict | None = None,
) -> tuple[int, int, int]:
    """Cut, encode and write documents into one bank; returns (documents, references, tokens).
    With `empty_error`, a bank without references is an error (and nothing is written)."""
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
    progress = Progress(
        TextColumn("encoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("docs"),
        TextColumn("{task.fields[refs]} refs, {task.fields[rate]} refs/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show_progress or not console.is_terminal,
    )
    writer = BankWriter(
        out,
        header,
        codec,
        cfg.memory_shape,
        overwrite=overwrite,
        resume=resume,
        resume_key=resume_key,
        **(codec_args if codec == "vq" else {}),
    )
    skip = int(writer.resumed.get("docs_done", 0))
    with writer, progress:
        task = progress.add_task("encode", total=total, refs=writer.n_refs, rate="-", completed=skip)
        docs_done, start_refs = skip, writer.n_refs
        # queued work, in order: ("ref", text, ids) and ("end", document); encoded when a batch is
        # full at a document's end, or mid-document once MID_DOC_REFS are waiting (a long document
        # streams through in bounded memory; checkpoints stay at document boundaries)
        pending: list[tuple] = []
        n_pending = 0
        last_checkpoint = time.monotonic()

        def flush() -> None:
            nonlocal n_pending, docs_done, last_checkpoint
            flat = [item[2] for item in pending if item[0] == "ref"]
            results = [_encode_batch(model, flat[s : s + batch_size]) for s in range(0, len(flat), batch_size)]
            kv = torch.cat([r[0] for r in results]) if results else None
            pos = torch.cat([r[1] for r in results]) if results else None
            k = ended = 0
            for item in pending:
                if item[0] == "ref":
                    writer.add_reference(item[1], len(item[2]), kv[k], pos[k])
                    k += 1
                else:
                    doc = item[1]
                    writer.end_document(doc.id, doc.title, doc.source)
                    ended += 1
            docs_done += ended
            if ended and not writer.in_document and time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                writer.checkpoint({"docs_done": docs_done})  # always at a batch and document boundary
                last_checkpoint = time.monotonic()
            elapsed = max(progress.tasks[0].elapsed or 1e-9, 1e-9)
            progress.update(
                task, advance=ended, refs=writer.n_refs, rate=f"{(writer.n_refs - start_refs) / elapsed:.1f}"
            )
            pending.clear()
            n_pending = 0

        for doc in itertools.islice(documents, skip, None):
            for text, ids in iter_references(doc.pieces(), tokenizer, cfg.reference_length):
                pending.append(("ref", text, ids))
                n_pending += 1
                if n_pending >= max(batch_size, MID_DOC_REFS):
                    flush()
            pending.append(("end", doc))
            if n_pending >= batch_size:
                flush()
        flush()
        if writer.n_refs == 0 and empty_error:
            raise M3Error(empty_error)
        writer.finish()
    return writer.n_docs, writer.n_refs, writer.n_tokens
