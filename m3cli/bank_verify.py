"""Full verification of a bank (`m3 inspect --verify`, and every writer before it publishes):
every checksum, every record, the documents and texts tiling their sections, positions inside
their references, finite memories. format_spec.md "Reading rules" lists what is checked."""

from __future__ import annotations

import hashlib

import torch

from .bank import (
    _DOC,
    _REF,
    DOC_RECORD_SIZE,
    MAX_PROBLEMS,
    REF_RECORD_SIZE,
    VQ_SECTION,
    Bank,
    BankError,
    Segment,
    segment_name,
)
from .errors import M3Error


def verify(bank: Bank, progress=None, allow_empty: bool = False, segments: list[int] | None = None) -> list[str]:
    """Recompute every checksum and check every record; returns the problems found.
    allow_empty: a bank without references is not a problem (the part of a sharded encode
    whose share of the corpus was empty). segments: check only these segments' sections and
    records (what `m3 add` is about to publish; the rest was verified when it was written)."""
    problems = []
    chosen = [seg for seg in bank.segments if segments is None or seg.number in segments]
    for f in bank._parts:
        where = "" if f is bank else f"{f.path.name}: "
        for s in f.sections.values():
            if segments is not None and segment_name(s.name)[0] not in segments:
                continue
            h = hashlib.sha256()
            view = memoryview(f._mm)[s.offset : s.offset + s.length]
            for start in range(0, s.length, 1 << 24):
                h.update(view[start : start + (1 << 24)])
                f._release(s.offset + start, min(1 << 24, s.length - start))
            if h.digest() != s.sha256:
                problems.append(f"{where}section {s.name}: SHA-256 mismatch")
            if progress:
                progress(where + s.name)
    if problems:
        return problems

    def note(message: str) -> bool:
        problems.append(message)
        return len(problems) >= MAX_PROBLEMS

    if bank.n_refs == 0 and not allow_empty:
        return ["the bank holds no references"]
    tokens = 0
    for seg in chosen:
        if _verify_documents(bank, seg, note):
            return problems
        counted = _verify_references(bank, seg, note)
        if counted is None:
            return problems
        tokens += counted
    if (
        segments is None
        and "m3.bank.tokens" in bank.header
        and bank.header["m3.bank.tokens"] != tokens
        and note(f"header says {bank.header['m3.bank.tokens']} tokens, the references hold {tokens}")
    ):
        return problems
    if bank.codec == "vq" and not all(torch.isfinite(f.codebooks()).all() for f in bank._parts):
        note(f"section {VQ_SECTION}: codebooks hold values that are not finite numbers")
        return problems
    if bank.codec == "vq":
        return problems  # codes are bytes: any value decodes to a finite codebook entry
    per_chunk = max(1, (1 << 24) // bank.record_bytes)
    for seg in chosen:
        for start in range(seg.first_ref, seg.first_ref + seg.n_refs, per_chunk):
            end = min(start + per_chunk, seg.first_ref + seg.n_refs)
            enc = bank.memories(range(start, end))
            f = bank._parts[seg.part]
            f._release(
                f.sections[seg.prefix + "kv.data"].offset + (start - seg.first_ref) * bank.record_bytes,
                (end - start) * bank.record_bytes,
            )
            bad = (~torch.isfinite(enc.kv)).flatten(1).any(1)
            if bad.any():
                note(f"reference {start + int(bad.nonzero()[0, 0])}: memory holds values that are not finite numbers")
                return problems
    return problems


def _verify_documents(bank: Bank, seg: Segment, note) -> bool:
    """A segment's documents tile its references in order and their strings tile its
    docs.strings; True when verification should stop."""
    expected_first = seg.first_ref
    strings_end = 0
    f = bank._parts[seg.part]
    table = f.sections[seg.prefix + "docs.table"].offset
    for j in range(seg.first_doc, seg.first_doc + seg.n_docs):
        try:
            d = bank.document(j)
        except M3Error as e:
            if note(str(e)):
                return True
            continue
        off, li, lt, ls, *_ = _DOC.unpack_from(f._mm, table + (j - seg.first_doc) * DOC_RECORD_SIZE)
        if off != strings_end and note(
            f"document {j}: its strings start at byte {off} of {seg.prefix}docs.strings, expected {strings_end}"
        ):
            return True
        strings_end = off + li + lt + ls
        if d.first_ref != expected_first and note(
            f"document {j} starts at reference {d.first_ref}, expected {expected_first}"
        ):
            return True
        expected_first = d.first_ref + d.n_refs
    end = seg.first_ref + seg.n_refs
    if expected_first != end and note(f"documents cover references up to {expected_first}, expected {end}"):
        return True
    held = f.sections[seg.prefix + "docs.strings"].decoded_length
    return strings_end != held and note(
        f"documents' strings end at byte {strings_end}, {seg.prefix}docs.strings holds {held}"
    )


def _verify_references(bank: Bank, seg: Segment, note) -> int | None:
    """A segment's references: texts tile its refs.text in order, each names its document and
    its place in it, reserved bytes are zero, kept positions lie inside the reference. Returns
    the tokens counted, or None when verification should stop."""
    text_end = 0  # references' texts tile refs.text in order
    prefix = bank.prefix_length
    tokens = 0
    f = bank._parts[seg.part]
    table = f.sections[seg.prefix + "refs.table"].offset
    text_length = f.sections[seg.prefix + "refs.text"].length
    clean = True
    for start in range(seg.first_ref, seg.first_ref + seg.n_refs, 4096):
        idx = list(range(start, min(start + 4096, seg.first_ref + seg.n_refs)))
        pos = bank.positions(idx)
        for k, i in enumerate(idx):
            try:
                ref = bank.reference(i)
                doc = bank.document(ref.doc_index)
                if not doc.first_ref <= i < doc.first_ref + doc.n_refs or ref.index_in_doc != i - doc.first_ref:
                    raise BankError(f"reference {i} does not belong to document {ref.doc_index} as the table says")
                text_off, text_len, *_rest, reserved = _REF.unpack_from(
                    f._mm, table + (i - seg.first_ref) * REF_RECORD_SIZE
                )
                if text_off != text_end:
                    raise BankError(
                        f"reference {i}: its text starts at byte {text_off} of {seg.prefix}refs.text, "
                        f"expected {text_end}"
                    )
                if reserved != b"\0" * 8:
                    raise BankError(f"reference {i}: reserved bytes are not zero")
                text_end = text_off + text_len
            except M3Error as e:
                clean = False
                if note(str(e)):
                    return None
                continue
            tokens += ref.token_count
            real = pos[k][pos[k] >= 0]
            if real.numel() and (int(real.min()) < prefix or int(real.max()) >= prefix + ref.token_count):
                clean = False
                if note(f"reference {i}: kept positions outside the reference"):
                    return None
            if (pos[k] < -1).any():
                clean = False
                if note(f"reference {i}: invalid kept position (below -1)"):
                    return None
    if text_end != text_length and clean:
        if note(f"references' texts end at byte {text_end}, {seg.prefix}refs.text holds {text_length}"):
            return None
    return tokens
