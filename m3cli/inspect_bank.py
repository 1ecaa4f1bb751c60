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
    return {
        "kind": "bank",
        "path": str(bank.path),
        "format_version": f"{bank.version[0]}.{bank.version[1]}",
        "model_fingerprint": h.get("m3.model.fingerprint"),
        "model_name": h.get("m3.model.name"),
        "model_hint": h.get("m3.model.hint"),
        "documents": bank.n_docs,
        "references": bank.n_refs,
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
        "sections": [{"name": s.name, "offset": s.offset, "bytes": s.length, "decoded_bytes": s.decoded_length,
                      "codec": s.codec, "sha256": s.sha256.hex()} for s in bank.sections.values()],
    }


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
                entry["tokens"] = [tokenizer.decode([token_ids[p - prefix]]) if 0 <= p - prefix < len(token_ids)
                                   else None for p in pos]
            heads.append(entry)
        kept.append({"layer": layers[m], "heads": heads})
    return {"index": i, "document": {"index": doc.index, "id": doc.id, "title": doc.title, "source": doc.source},
            "index_in_document": ref.index_in_doc, "token_count": ref.token_count, "text": ref.text,
            "prefix_length": prefix, "kept": kept}


def inspect_bank(path: Path, as_json: bool, ref: int | None, model_dir: Path | None, verify: bool,
                 echo: Callable[[str], None]) -> None:
    from .output import print_fields, terminal_safe

    with Bank(path) as bank:
        if verify:
            problems = bank.verify()
            if as_json:
                echo(json.dumps({"ok": not problems, "problems": problems}))
            for p in problems if not as_json else []:
                echo(f"problem: {terminal_safe(p)}")
            if problems:
                raise M3Error(f"{path}: {len(problems)} problem(s) found; first: {problems[0]}")
            if not as_json:
                echo(f"ok: {bank.n_refs} references, {len(bank.sections)} sections, all checksums and records valid")
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
            echo(f"reference {ref} of document {terminal_safe(doc['id'])!s} "
                 f"({terminal_safe(doc['title'])}), {detail['token_count']} tokens")
            echo(terminal_safe(detail["text"]))
            for layer in detail["kept"]:
                for head in layer["heads"]:
                    shown = head.get("tokens") or head["positions"]
                    echo(f"  layer {layer['layer']:>3} kv-head {head['kv_head']:>2}: "
                         + " ".join(terminal_safe(repr(t)) for t in shown))
            return
        summary = bank_summary(bank)
        if as_json:
            echo(json.dumps(summary))
            return
        sections = summary.pop("sections")
        print_fields(summary)
        echo("sections:")
        for s in sections:
            echo(f"  {s['name']:<14} {s['bytes']:>14,} B  {s['codec']:<5} sha256:{s['sha256'][:16]}…")
