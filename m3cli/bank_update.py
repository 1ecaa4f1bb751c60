"""Banks that change without being re-encoded: `m3 add` appends documents as a new segment,
`m3 remove` records removed documents, `m3 compact` rewrites the file without them.

Every change is one atomic switch of the bank (an appended segment and a new section table,
then the 64-byte preamble: `bank_writer.update_bank`; or a whole new file renamed into place),
made while holding the bank's writer lock, so a crash at any point leaves the old bank or the
new one. Adding n documents reads and writes only those n (plus the documents' ids, to keep
them unique); the format is in format_spec.md ("Appended segments", "Removed documents").
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .atomic import crash_point, output_lock, remove_path
from .bank import (
    _DOC,
    _REF,
    MAX_SEGMENTS,
    REMOVED_SECTION,
    SECTION_FLAG_REQUIRED,
    VQ_SECTION,
    Bank,
    BankError,
)
from .bank_writer import packed_docs_strings, update_bank, write_bank_file
from .errors import M3Error

_REF_DTYPE = np.dtype([("off", "<u8"), ("len", "<u4"), ("tokens", "<u4"), ("doc", "<u4"), ("idx", "<u4"), ("r", "V8")])
_DOC_DTYPE = np.dtype(
    [("off", "<u8"), ("li", "<u4"), ("lt", "<u4"), ("ls", "<u4"), ("first", "<u4"), ("n", "<u4"), ("r", "<u4")]
)
assert _REF_DTYPE.itemsize == _REF.size and _DOC_DTYPE.itemsize == _DOC.size


def _single(path: Path) -> Path:
    """The real path of a single bank file; a bank set is refused (its shards are written by
    `m3 encode`; add, remove and compact change one file)."""
    path = Path(os.path.realpath(path))
    if path.is_dir():
        raise M3Error(f"{path} is a bank set: add, remove and compact change a single .m3bank (re-encode the set)")
    if not path.is_file():
        raise M3Error(f"bank {path} does not exist")
    if (path.parent / "manifest.json").is_file():
        from .bankset import read_manifest

        try:
            listed = {e["file"] for e in read_manifest(path.parent)["shards"]}
        except M3Error:
            listed = set()
        if path.name in listed:
            raise M3Error(f"{path} is a shard of the bank set {path.parent}: changing it would break the set")
    return path


def document_ids(bank: Bank) -> dict[str, list[int]]:
    """Each document id of the bank's documents that are not removed -> their indices."""
    ids: dict[str, list[int]] = {}
    for j in range(bank.n_docs):
        if not bank.is_removed(j):
            ids.setdefault(bank.document(j).id, []).append(j)
    return ids


def _removed_bytes(removed) -> bytes:
    return np.array(sorted(removed), dtype="<u4").tobytes()


def add_documents(
    path: Path,
    corpus: str,
    model_dir: Path,
    *,
    replace: bool = False,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    show_progress: bool = True,
    max_doc_bytes: int | None = None,
    encoder: str | None = None,
) -> dict:
    """Encode `corpus` with the bank's model and append it to the bank as one segment (embedded
    and indexed with the bank's embedder when the bank has an index). Document ids must be new
    unless `replace`, which removes the bank's documents of the same ids in the same switch.
    A killed run continues its encoding when run again."""
    from .corpus import MAX_DOC_BYTES, read_corpus
    from .encoding import encode_corpus

    t0 = time.perf_counter()
    path = _single(path)
    max_doc_bytes = max_doc_bytes or MAX_DOC_BYTES
    with output_lock(path):
        sweep(path)
        with Bank(path) as bank:
            full = len(bank.segments) - 1 >= MAX_SEGMENTS
        if full:  # the header lists at most MAX_SEGMENTS appended segments: fold them into one first
            compact_bank(path)
        with Bank(path) as bank:
            _check_model(bank, model_dir)
            existing = document_ids(bank)
            indexed = bank.has_index
            embedder = None
            if indexed:
                from .retrieval import query_embedder

                embedder = query_embedder(bank, model_dir=model_dir, encoder=encoder)  # fails before encoding
            codec, hint = bank.codec, bank.header.get("m3.model.hint")
        if str(corpus) != "-":  # a file can be read twice: refuse clashing ids before encoding anything
            try:
                _check_ids(
                    [d.id for d in read_corpus(corpus, stream=True, max_doc_bytes=max_doc_bytes)], existing, replace
                )
            except M3Error:
                _remove_spools(path, keep=None)  # e.g. the spool of an add that was killed once it was done
                raise
        spool = _spool(path, corpus, batch_size, device, dtype)
        encode_corpus(
            corpus,
            model_dir,
            spool,
            codec="bf16" if codec == "vq" else codec,  # vq: quantized below with the bank's own codebooks
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            overwrite=True,
            resume=str(corpus) != "-",
            show_progress=show_progress,
            model_hint=hint if isinstance(hint, str) else None,
            max_doc_bytes=max_doc_bytes,
        )
        crash_point("add:encoded")
        try:
            summary = _append(path, spool, existing, replace, embedder, show_progress)
        finally:
            _remove_spools(path, keep=None)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _spool(path: Path, corpus: str, batch_size: int, device: str, dtype: str) -> Path:
    """Where `m3 add` encodes: a hidden bank beside `path`, named after the corpus and settings so
    that running the same command again continues it; other runs' leftovers are removed."""
    import hashlib
    import json

    from .encoding import _corpus_identity

    key = json.dumps([_corpus_identity(str(corpus)), batch_size, device, dtype], sort_keys=True)
    spool = path.parent / f".{path.name}.add-{hashlib.sha256(key.encode()).hexdigest()[:16]}.m3bank"
    _remove_spools(path, keep=spool)
    return spool


def sweep(path: Path) -> None:
    """Remove what a killed compaction or whole-file rewrite of `path` left beside it (its
    section spools and temporary file); called holding the bank's lock, so none is in use."""
    for name in os.listdir(path.parent):
        if any(name.startswith(f".{path.name}.{kind}-") for kind in ("compact", "tmp", "sections")):
            remove_path(path.parent / name)


def _remove_spools(path: Path, keep: Path | None) -> None:
    """Remove what `m3 add` left beside `path` (spool banks, their encode and embedding spools and
    locks), but for `keep`'s."""
    for name in os.listdir(path.parent):
        ours = name.startswith(f".{path.name}.add-") or name.startswith(f"..{path.name}.add-")
        if ours and not (keep is not None and keep.name in name):
            remove_path(path.parent / name)


def _check_model(bank: Bank, model_dir: Path) -> None:
    from .bank import require_geometry, require_same_model
    from .checkpoint import model_fingerprint, read_config

    cfg = read_config(model_dir)
    require_same_model(bank, model_fingerprint(model_dir, cfg))
    require_geometry(bank, cfg)


def _check_ids(new: list[str], existing: dict[str, list[int]], replace: bool) -> None:
    seen: set[str] = set()
    for doc_id in new:
        if doc_id in seen:
            raise M3Error(f"the new documents hold the id {doc_id!r} twice; document ids must be unique")
        seen.add(doc_id)
        if doc_id in existing and not replace:
            raise M3Error(
                f"the bank already holds a document with id {doc_id!r} (rows without an id are numbered "
                "from 0): give the documents their own ids, or pass --replace to replace it"
            )


def _append(path: Path, spool: Path, existing: dict, replace: bool, embedder, show_progress: bool) -> dict:
    """Turn the freshly encoded bank `spool` into the next segment of `path` and switch to it."""
    from .retrieval import EMB_SECTION, INDEX_SECTION, auto_factory, build_index, compute_embeddings, index_problems

    with Bank(path) as bank, Bank(spool) as new:
        new_ids = [new.document(j).id for j in range(new.n_docs)]
        _check_ids(new_ids, existing, replace)
        k = len(bank.segments)
        n_refs, n_docs = bank.n_refs, bank.n_docs
        if n_refs + new.n_refs >= 2**32 or n_docs + new.n_docs >= 2**32:
            raise M3Error("a bank holds fewer than 2^32 references and documents; start a new bank")
        prefix = f"s{k}."
        refs = np.frombuffer(new.raw("refs.table"), dtype=_REF_DTYPE).copy()
        refs["doc"] += n_docs
        docs = np.frombuffer(new.raw("docs.table"), dtype=_DOC_DTYPE).copy()
        docs["first"] += n_refs

        def stored(name: str) -> tuple[Path, int, int]:  # streamed from the spool, not held in memory
            return (spool, new.sections[name].offset, new.sections[name].length)

        add: dict[str, bytes | Path | tuple[Path, int, int]] = {
            prefix + "refs.table": refs.tobytes(),
            prefix + "refs.text": stored("refs.text"),
            prefix + "docs.table": docs.tobytes(),
            prefix + "docs.strings": new.decoded("docs.strings"),
            prefix + "kv.positions": stored("kv.positions"),
        }
        add[prefix + "kv.data"] = _vq_records(bank, new) if bank.codec == "vq" else stored("kv.data")
        flags = dict.fromkeys(add, SECTION_FLAG_REQUIRED)
        header = {
            "m3.bank.references": n_refs + new.n_refs,
            "m3.bank.documents": n_docs + new.n_docs,
            "m3.bank.tokens": (  # kept absent where it is (a bank written before m3 counted tokens)
                bank.header["m3.bank.tokens"] + new.header["m3.bank.tokens"]
                if "m3.bank.tokens" in bank.header
                else None
            ),
            "m3.bank.segments": [
                *bank.header.get("m3.bank.segments", []),
                {"references": new.n_refs, "documents": new.n_docs},
            ],
        }
        if embedder is not None:
            vectors = compute_embeddings(new, embedder, show_progress=show_progress)
            import faiss

            index = build_index(vectors, auto_factory(new.n_refs, vectors.shape[1]))
            add[prefix + EMB_SECTION] = vectors.astype("<f2").tobytes()
            add[prefix + INDEX_SECTION] = faiss.serialize_index(index).tobytes()
            flags[prefix + EMB_SECTION] = flags[prefix + INDEX_SECTION] = 0
            header["m3.index.count"] = n_refs + new.n_refs
        replaced = [j for doc_id in new_ids for j in existing.get(doc_id, ())] if replace else []
        if replaced:
            add[REMOVED_SECTION] = _removed_bytes(set(bank.removed.tolist()) | set(replaced))
            flags[REMOVED_SECTION] = SECTION_FLAG_REQUIRED
        summary = {
            "bank": str(path),
            "segment": k,
            "added_documents": new.n_docs,
            "added_references": new.n_refs,
            "replaced_documents": len(replaced),
        }

    def check(b: Bank) -> list[str]:  # only what this switch adds: the rest was verified when written
        return b.verify(segments=[k]) or index_problems(b, segments=[k])

    update_bank(path, add, header, flags=flags, check=check)
    with Bank(path) as bank:
        summary.update(documents=bank.live_docs, references=bank.n_refs - bank.removed_refs)
    return summary


def _vq_records(bank: Bank, new: Bank) -> bytes:
    """The new references' memories (stored bf16 in the spool) as codes of the bank's codebooks."""
    from . import vq

    books = bank.codebooks()
    out = []
    for start in range(0, new.n_refs, 256):
        enc = new.memories(range(start, min(start + 256, new.n_refs)))
        out.append(vq.encode(enc.kv, books).numpy().tobytes())
    return b"".join(out)


def remove_documents(path: Path, doc_ids: list[str]) -> dict:
    """Mark the documents with these ids removed (never retrieved again); their bytes stay until
    `compact_bank`. An id the bank does not hold is an error, and nothing changes."""
    path = _single(path)
    if not doc_ids:
        raise M3Error("name the documents to remove with --doc ID")
    with output_lock(path):
        sweep(path)
        with Bank(path) as bank:
            existing = document_ids(bank)
            missing = [d for d in doc_ids if d not in existing]
            if missing:
                raise M3Error(f"{path} holds no document with id {missing[0]!r} (or it was removed already)")
            chosen = {j for d in doc_ids for j in existing[d]}
            removed = set(bank.removed.tolist()) | chosen
            refs = sum(bank.document(j).n_refs for j in chosen)
        update_bank(
            path, {REMOVED_SECTION: _removed_bytes(removed)}, {}, flags=SECTION_FLAG_REQUIRED, check=lambda b: []
        )
        with Bank(path) as bank:
            return {
                "bank": str(path),
                "removed_documents": len(chosen),
                "removed_references": refs,
                "documents": bank.live_docs,
                "references": bank.n_refs - bank.removed_refs,
            }


def compact_bank(path: Path, show_progress: bool = False) -> dict:
    """Rewrite the bank as one segment without its removed documents: records copied as stored
    (no re-encoding, no re-embedding), references renumbered, the index rebuilt from the stored
    embeddings with the bank's factory. Atomic: a new file renamed into place."""
    from .retrieval import EMB_SECTION, INDEX_SECTION

    t0 = time.perf_counter()
    path = _single(path)
    with output_lock(path):
        sweep(path)
        before = path.stat().st_size
        with Bank(path) as bank:
            if len(bank.segments) == 1 and not bank.removed.size:
                return {"bank": str(path), "compacted": False, "bytes_before": before, "bytes_after": before}
            live = [j for j in range(bank.n_docs) if not bank.is_removed(j)]
            if not any(bank.document(j).n_refs for j in live):
                raise M3Error(f"every document of {path} is removed: nothing would be left (delete the file instead)")
            with_emb = all(seg.prefix + EMB_SECTION in bank.sections for seg in bank.segments)
            with tempfile.TemporaryDirectory(prefix=f".{path.name}.compact-", dir=path.parent) as tmp:
                header, sections = _write_live(bank, live, Path(tmp), with_emb, show_progress)
                if with_emb and INDEX_SECTION in bank.sections:
                    sections.append(_rebuild_index(bank, header, Path(tmp)))
                else:
                    for key in [k for k in header if k.startswith("m3.index.")]:
                        del header[key]
                write_bank_file(path, header, sections)
        return {
            "bank": str(path),
            "compacted": True,
            "documents": header["m3.bank.documents"],
            "references": header["m3.bank.references"],
            "bytes_before": before,
            "bytes_after": path.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3),
        }


def _write_live(bank: Bank, live: list[int], tmp: Path, with_emb: bool, show_progress: bool) -> tuple[dict, list]:
    """Spool the live documents' sections into `tmp`; (header, sections for write_bank_file)."""
    from .output import stderr_progress
    from .retrieval import EMB_SECTION

    progress = stderr_progress("compacting", show_progress)
    names = ["refs.table", "refs.text", "docs.table", "docs.strings", "kv.data", "kv.positions"]
    if with_emb:
        names.append(EMB_SECTION)
    files = {name: open(tmp / name, "wb") for name in names}
    L, _, H, K, _ = bank.memory_shape
    dim = int(bank.header.get("m3.embed.dim", 0))
    n_refs = text_off = strings_off = tokens = 0
    try:
        progress.start()
        task = progress.add_task("documents", total=len(live))
        for new_doc, j in enumerate(live):
            progress.update(task, completed=new_doc)
            d = bank.document(j)
            strings = [s.encode("utf-8") for s in (d.id, d.title, d.source)]
            files["docs.strings"].write(b"".join(strings))
            files["docs.table"].write(_DOC.pack(strings_off, *(len(s) for s in strings), n_refs, d.n_refs, 0))
            strings_off += sum(len(s) for s in strings)
            idx = np.arange(d.first_ref, d.first_ref + d.n_refs, dtype=np.int64)
            for r in idx:
                ref = bank.reference(int(r))
                text = ref.text.encode("utf-8")
                files["refs.text"].write(text)
                files["refs.table"].write(
                    _REF.pack(text_off, len(text), ref.token_count, new_doc, ref.index_in_doc, b"\0" * 8)
                )
                text_off += len(text)
                tokens += ref.token_count
            files["kv.data"].write(bank._gather("kv.data", idx, bank.record_bytes).tobytes())
            files["kv.positions"].write(bank._gather("kv.positions", idx, L * H * K * 2).tobytes())
            if with_emb:
                files[EMB_SECTION].write(bank._gather(EMB_SECTION, idx, dim * 2).tobytes())
            n_refs += d.n_refs
    finally:
        progress.stop()
        for f in files.values():
            f.close()
    header = {k: v for k, v in bank.header.items() if k != "m3.bank.segments"}
    header.update({"m3.bank.references": n_refs, "m3.bank.documents": len(live), "m3.bank.tokens": tokens})
    if "m3.index.count" in header:
        header["m3.index.count"] = n_refs
    sections: list[tuple] = []
    for name in names[:6]:
        spool, codec, size = tmp / name, "raw", (tmp / name).stat().st_size
        if name == "docs.strings":
            spool, codec = packed_docs_strings(spool)
        sections.append((name, spool, codec, size))
    if VQ_SECTION in bank.sections:
        s = bank.sections[VQ_SECTION]
        sections.append((VQ_SECTION, (bank.path, s.offset, s.length), "raw", s.length))
    if with_emb:
        sections.append((EMB_SECTION, tmp / EMB_SECTION, "raw", (tmp / EMB_SECTION).stat().st_size, 0))
    return header, sections


def _rebuild_index(bank: Bank, header: dict, tmp: Path) -> tuple:
    """The index over the live references' stored embeddings, built with the bank's factory."""
    import faiss

    from .retrieval import INDEX_SECTION, build_index

    dim = int(header["m3.embed.dim"])
    vectors = np.fromfile(tmp / "emb.data", dtype="<f2").reshape(-1, dim).astype(np.float32)
    factory = str(header.get("m3.index.factory") or "Flat")
    try:
        index = build_index(vectors, factory)
    except M3Error as e:
        raise M3Error(f"{e}; rebuild the index with `m3 index {bank.path} --factory …` after compacting") from None
    (tmp / INDEX_SECTION).write_bytes(faiss.serialize_index(index).tobytes())
    return (INDEX_SECTION, tmp / INDEX_SECTION, "raw", (tmp / INDEX_SECTION).stat().st_size, 0)


__all__ = ["BankError", "add_documents", "compact_bank", "document_ids", "remove_documents"]
