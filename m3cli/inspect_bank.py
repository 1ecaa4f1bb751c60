"""`m3 inspect BANK`: a bank's summary, one reference's kept tokens, and full verification.

Reads through bank.Bank only; output is terminal-safe (control characters escaped) and, with
--json, plain JSON for pipelines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .bank import Bank, record_bytes
from .corpus import reference_ids
from .errors import M3Error


def bank_summary(bank: Bank) -> dict:
    h = bank.header
    bf16 = record_bytes("bf16", bank.memory_shape)
    out = {
        "kind": "bank set" if bank.is_set else "bank",
        "path": str(bank.path),
        "format_version": f"{bank.version[0]}.{bank.version[1]}",
        "model_fingerprint": h.get("m3.model.fingerprint"),
        "model_name": h.get("m3.model.name"),
        "model_hint": h.get("m3.model.hint"),
        "documents": bank.live_docs,
        "references": bank.n_refs - bank.removed_refs,
        "appended_segments": 0 if bank.is_set else len(bank.segments) - 1,
        "removed_documents": int(bank.removed.size),
        "removed_references": bank.removed_refs,
        "tokens": h.get("m3.bank.tokens"),
        "codec": bank.codec,
        "memory_shape": list(bank.memory_shape),
        "memory_layer_ids": h.get("m3.memory.layer_ids"),
        "bytes_per_reference": bank.record_bytes,
        "bytes_per_reference_bf16": bf16,
        "compression_vs_bf16": round(bf16 / bank.record_bytes, 3),
        "embedder": h.get("m3.embed.name"),
        "embedder_hint": h.get("m3.embed.hint"),
        "index_factory": h.get("m3.index.factory"),
        "file_bytes": bank.size,
        "sections": [
            {
                "name": s.name,
                "offset": s.offset,
                "bytes": s.length,
                "decoded_bytes": s.decoded_length,
                "codec": s.codec,
                "sha256": s.sha256.hex(),
            }
            for s in bank.sections.values()
        ],
    }
    if bank.is_set:
        out["shards"] = [
            {"file": f.path.name, "documents": f.n_docs, "references": f.n_refs, "bytes": f.size} for f in bank._parts
        ]
        index = bank.manifest.get("index")
        out["index_file"] = index["file"] if index else None
    return out


def reference_detail(bank: Bank, i: int, tokenizer=None) -> dict:
    ref = bank.reference(i)
    doc = bank.document(ref.doc_index)
    positions = bank.positions([i])[0]  # (L, H, K)
    prefix = bank.prefix_length
    token_ids = reference_ids(tokenizer, ref.text) if tokenizer is not None else None
    layers = bank.header["m3.memory.layer_ids"]  # validated when the bank was opened
    kept = []
    for m in range(positions.shape[0]):
        heads = []
        for h in range(positions.shape[1]):
            pos = [int(p) for p in positions[m, h] if p >= 0]
            entry = {"kv_head": h, "positions": pos}
            if token_ids is not None:
                entry["tokens"] = [
                    tokenizer.decode([token_ids[p - prefix]]) if 0 <= p - prefix < len(token_ids) else None for p in pos
                ]
            heads.append(entry)
        kept.append({"layer": layers[m], "heads": heads})
    return {
        "index": i,
        "document": {"index": doc.index, "id": doc.id, "title": doc.title, "source": doc.source},
        "index_in_document": ref.index_in_doc,
        "token_count": ref.token_count,
        "text": ref.text,
        "prefix_length": prefix,
        "kept": kept,
    }


def model_problems(bank: Bank, model_dir: Path) -> list[str]:
    """How a bank would not work with the model dir: another model's fingerprint, memories of
    another geometry, an index built with an embedder that model or this install does not have."""
    from .bank import geometry_problems
    from .checkpoint import model_fingerprint, read_config
    from .embed import EmbedderSpec, expected_spec

    cfg, fingerprint = read_config(model_dir), model_fingerprint(model_dir)
    problems = []
    if bank.header.get("m3.model.fingerprint") != fingerprint:
        problems.append(
            f"encoded by model {bank.header.get('m3.model.fingerprint')}, not by {model_dir} ({fingerprint})"
        )
    problems += geometry_problems(bank, cfg)
    spec = EmbedderSpec.from_header(bank.header)
    if spec is not None and bank.has_index:
        want = expected_spec(spec, model_dir, fingerprint, cfg.hidden_size)
        if want is not None and not spec.same_as(want):
            problems.append(
                f"indexed with embedder {spec.name} (dim {spec.dim}, {spec.fingerprint[:19]}…), which is "
                f"not the {want.name} embedder here (dim {want.dim}, {want.fingerprint[:19]}…)"
            )
    return problems


def _model_for_verify(path: Path, model_dir: Path | None) -> Path | None:
    """--model, $M3_MODEL, or the model the bank names when it is here (never materialised for this)."""
    from .default_model import DEFAULT_NAME, choose_model, default_model_dir

    try:
        value, _ = choose_model(model_dir, path)
    except M3Error:
        return None  # the named model is not here: checked when a command is given one
    if value == DEFAULT_NAME:
        target = default_model_dir()
        return target if (target / "config.json").is_file() else None
    return Path(value)


def verify_problems(bank: Bank, model_dir: Path | None = None) -> list[str]:
    """Everything `m3 inspect --verify` checks: structure, checksums and every record; the
    embeddings and index; and, given a model dir, that the bank fits it."""
    from .retrieval import index_problems

    problems = bank.verify() or index_problems(bank)
    if not problems and model_dir is not None:
        problems = model_problems(bank, model_dir)
    return problems


def inspect_bank(
    path: Path, as_json: bool, ref: int | None, model_dir: Path | None, verify: bool, echo: Callable[[str], None]
) -> None:
    from .output import print_fields, terminal_safe

    with Bank(path) as bank:
        if verify:
            checked_model = _model_for_verify(path, model_dir)
            problems = verify_problems(bank, checked_model)
            if as_json:
                echo(
                    json.dumps(
                        {
                            "ok": not problems,
                            "problems": problems,
                            "model": str(checked_model) if checked_model else None,
                        }
                    )
                )
            for p in problems if not as_json else []:
                echo(f"problem: {terminal_safe(p)}")
            if problems:
                raise M3Error(f"{path}: {len(problems)} problem(s) found; first: {problems[0]}")
            if not as_json:
                against = ""
                if checked_model is not None:
                    against = f", fits the model {model_dir}" if model_dir is not None else ", fits its model"
                echo(
                    f"ok: {bank.n_refs} references, "
                    + (f"{len(bank._parts)} shards" if bank.is_set else f"{len(bank.sections)} sections")
                    + ", all checksums and records valid, "
                    f"index loads{against}"
                )
            return
        if ref is not None:
            tokenizer = None
            if model_dir is not None:
                from .checkpoint import load_tokenizer

                tokenizer = load_tokenizer(model_dir)
            detail = reference_detail(bank, ref, tokenizer)
            if as_json:
                echo(json.dumps(detail))
                return
            doc = detail["document"]
            echo(
                f"reference {ref} of document {terminal_safe(doc['id'])!s} "
                f"({terminal_safe(doc['title'])}), {detail['token_count']} tokens"
            )
            echo(terminal_safe(detail["text"]))
            for layer in detail["kept"]:
                for head in layer["heads"]:
                    shown = head.get("tokens") or head["positions"]
                    echo(
                        f"  layer {layer['layer']:>3} kv-head {head['kv_head']:>2}: "
                        + " ".join(terminal_safe(repr(t)) for t in shown)
                    )
            return
        summary = bank_summary(bank)
        if as_json:
            echo(json.dumps(summary))
            return
        sections = summary.pop("sections")
        shards = summary.pop("shards", None)
        print_fields(summary)
        if shards is not None:
            echo("shards:")
            for sh in shards:
                echo(f"  {sh['file']}  {sh['documents']:>10,} documents  {sh['references']:>12,} references")
            return
        echo("sections:")
        for s in sections:
            echo(f"  {s['name']:<14} {s['bytes']:>14,} B  {s['codec']:<5} sha256:{s['sha256'][:16]}…")
