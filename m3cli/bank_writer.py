"""Writing .m3bank files: a streaming, resumable writer whose output appears only by atomic
rename; in-place updates that append sections without rewriting the KV payload; merging the
part banks of a sharded encode.

The layout is bank.py's (and format_spec.md's); this module knows nothing about models or
corpora: it stores the tensors, texts and metadata handed to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file, crash_point, make_parent, open_existing, output_lock, remove_path
from .bank import (
    _DOC,
    _ENTRY,
    _NAME_RE,
    _REF,
    KNOWN_SECTIONS,
    MAGIC,
    MAJOR,
    MAX_HEADER_BYTES,
    MAX_RECORD_BYTES,
    MAX_SECTIONS,
    MAX_ZSTD_RATIO,
    MINOR,
    PREAMBLE_SIZE,
    REMOVED_SECTION,
    SECTION_ENTRY_SIZE,
    SECTION_FLAG_REQUIRED,
    VQ_SECTION,
    Bank,
    BankError,
    _align,
    decode_kv,
    encode_kv,
    record_bytes,
)
from .errors import M3Error


class BankWriter:
    """Streams documents and their references into spool files beside the target; `finish()`
    assembles the bank and renames it into place, so the target never holds a partial bank.

    The spools live in `.<name>.partial/` next to the target. `checkpoint()` makes them durable
    with a state file; a writer opened with `resume=True` truncates the spools to the last
    checkpoint and continues, so a killed job resumes and yields the same bytes. Leaving the
    context manager with an error removes the spools; an interrupt (Ctrl-C) keeps them.
    """

    STATE = "state.json"

    def __init__(
        self,
        path: Path,
        header: dict,
        codec: str,
        memory_shape: tuple[int, int, int, int, int],
        overwrite: bool = False,
        resume: bool = False,
        resume_key: dict | None = None,
        vq_subquantizers: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from .vq import default_subquantizers

        self.path = Path(path)
        if self.path.is_dir():
            raise M3Error(f"{self.path} is a directory")
        if self.path.exists() and not overwrite:
            raise M3Error(f"{self.path} already exists; pass --force to replace it")
        self.codec, self.shape, self.device = codec, tuple(memory_shape), device
        self.header = dict(header)
        if codec == "vq":
            self.subquantizers = vq_subquantizers or default_subquantizers(self.shape[4])
            record_bytes(codec, self.shape, self.subquantizers)  # validates
            self.header["m3.memory.vq.subquantizers"] = self.subquantizers
        # vq spools exact bf16 records and quantizes them in finish(), after training on a sample
        self.spool_codec = "bf16" if codec == "vq" else codec
        self.record_bytes = record_bytes(self.spool_codec, self.shape)
        final = record_bytes(codec, self.shape, getattr(self, "subquantizers", None))
        if max(final, self.record_bytes) > MAX_RECORD_BYTES:  # what a reader accepts, checked before any work
            raise M3Error(
                f"memories of shape {self.shape} need {max(final, self.record_bytes):,} bytes per "
                f"reference; a bank holds at most {MAX_RECORD_BYTES:,}"
            )
        prefix = len(self.header.get("m3.model.reference_prefix_ids", ()))
        if prefix + int(self.header.get("m3.memory.reference_length", 0)) > 32767:
            raise M3Error("reference prefix + reference length exceed 32,767 tokens (positions are 16-bit)")
        self.spool = self.path.parent / f".{self.path.name}.partial"
        self._key = {"header": self.header, "codec": codec, "shape": list(self.shape), **(resume_key or {})}
        self.resumed: dict = {}
        self._doc_first: int | None = None  # first reference of the document being written
        make_parent(self.path)
        self._lock = output_lock(self.path)  # held until finish() or an error
        self._lock.__enter__()
        try:
            self._open_spool(overwrite, resume)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise

    def _open_spool(self, overwrite: bool, resume: bool) -> None:
        spool_is_ours = self.spool.is_dir() and not self.spool.is_symlink()
        if os.path.lexists(self.spool) and not resume and not overwrite:
            raise M3Error(
                f"an interrupted encode of {self.path} exists ({self.spool}); pass --resume to "
                "continue it or --force to start over"
            )
        state = self._load_state() if spool_is_ours and resume else None
        if state is not None:
            if state.get("key") != json.loads(json.dumps(self._key)):
                raise M3Error(
                    f"the interrupted encode in {self.spool} used other inputs or settings (model, "
                    "corpus, codec or batch size); rerun it as before, or pass --force to start over"
                )
            self._files = {}
            for name in KNOWN_SECTIONS:
                f = open_existing(self.spool / name)
                f.truncate(state["sizes"][name])
                f.seek(0, os.SEEK_END)
                self._files[name] = f
            self.n_refs, self.n_docs, self.n_tokens = state["n_refs"], state["n_docs"], state["n_tokens"]
            self._text_bytes, self._doc_bytes = state["text_bytes"], state["doc_bytes"]
            self.resumed = state.get("progress", {})
        else:
            remove_path(self.spool)  # a stale spool, or a link planted in its place (never followed)
            self.spool.mkdir()  # exclusive: fails if something appeared meanwhile
            self._files = {name: open(self.spool / name, "xb") for name in KNOWN_SECTIONS}
            self.n_refs = self.n_docs = self.n_tokens = 0
            self._text_bytes = self._doc_bytes = 0

    def _load_state(self) -> dict | None:
        try:
            state = json.loads((self.spool / self.STATE).read_text())
            sizes = state["sizes"]
            if not all(
                not (self.spool / n).is_symlink() and os.path.getsize(self.spool / n) >= sizes[n]
                for n in KNOWN_SECTIONS
            ):
                return None
            return state
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None  # no checkpoint yet: nothing to resume

    def __enter__(self) -> "BankWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        for f in self._files.values():
            f.close()
        if not issubclass(exc_type, KeyboardInterrupt):
            shutil.rmtree(self.spool, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def add_document(
        self, doc_id: str, title: str, source: str, refs: list[tuple[str, int, torch.Tensor, torch.Tensor]]
    ) -> int:
        """Append a document with its references: (text, token_count, kv (L, 2, H, K, d),
        positions (L, H, K)) each. Returns the document's index."""
        for text, token_count, kv, positions in refs:
            self.add_reference(text, token_count, kv, positions)
        return self.end_document(doc_id, title, source)

    def add_reference(self, text: str, token_count: int, kv, positions) -> None:
        """Append one reference of the document being written (see end_document); a document's
        references may arrive over many calls, so one document of any size streams through."""
        if self._doc_first is None:
            self._doc_first = self.n_refs
        if isinstance(kv, torch.Tensor):
            if tuple(kv.shape) != self.shape:
                raise ValueError(f"memory has shape {tuple(kv.shape)}, the bank stores {self.shape}")
            if not torch.isfinite(kv).all():  # found now, not by the check before the rename
                raise M3Error(
                    f"reference {self.n_refs} ({text[:40]!r}…): its memory holds values that are not "
                    "finite numbers (the model overflowed; try --dtype float32)"
                )
            record = encode_kv(kv, self.spool_codec)
            positions = positions.to(torch.int16).cpu().numpy().astype("<i2").tobytes()
        else:  # already-encoded records of the spool codec (merging banks)
            record, positions = bytes(kv), bytes(positions)
        L, _, H, K, _ = self.shape
        if len(record) != self.record_bytes or len(positions) != L * H * K * 2:
            raise ValueError("memory record has the wrong size for this bank")
        data = text.encode("utf-8")
        self._files["refs.text"].write(data)
        self._files["refs.table"].write(
            _REF.pack(self._text_bytes, len(data), token_count, self.n_docs, self.n_refs - self._doc_first, b"\0" * 8)
        )
        self._text_bytes += len(data)
        self._files["kv.data"].write(record)
        self._files["kv.positions"].write(positions)
        self.n_refs += 1
        self.n_tokens += int(token_count)

    def end_document(self, doc_id: str, title: str, source: str) -> int:
        """Close the document whose references were just added (none is fine); its index."""
        strings = [s.encode("utf-8") for s in (doc_id, title, source)]
        first = self.n_refs if self._doc_first is None else self._doc_first
        self._files["docs.strings"].write(b"".join(strings))
        self._files["docs.table"].write(
            _DOC.pack(self._doc_bytes, *(len(s) for s in strings), first, self.n_refs - first, 0)
        )
        self._doc_bytes += sum(len(s) for s in strings)
        self._doc_first = None
        self.n_docs += 1
        return self.n_docs - 1

    @property
    def in_document(self) -> bool:
        return self._doc_first is not None

    def _spooled(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 records and positions of spooled references -> (n, L, 2, H, K, d), (n, L, H, K)."""
        L, _, H, K, _ = self.shape
        per = L * H * K * 2
        kv = np.empty((len(indices), self.record_bytes), dtype=np.uint8)
        pos = np.empty((len(indices), per), dtype=np.uint8)
        with open(self.spool / "kv.data", "rb") as fk, open(self.spool / "kv.positions", "rb") as fp:
            for row, i in enumerate(indices):
                fk.seek(int(i) * self.record_bytes)
                kv[row] = np.frombuffer(fk.read(self.record_bytes), dtype=np.uint8)
                fp.seek(int(i) * per)
                pos[row] = np.frombuffer(fp.read(per), dtype=np.uint8)
        positions = torch.from_numpy(pos.view("<i2").astype(np.int16).reshape(len(indices), L, H, K))
        return decode_kv(kv, "bf16", self.shape), positions

    def _quantize(self) -> list[tuple[str, Path, str, int]]:
        """Train PQ codebooks on a sample of the spooled vectors, write vq records and codebooks."""
        from . import vq

        L, _, H, K, d = self.shape
        m = self.subquantizers
        if self.n_refs == 0:
            books = torch.zeros(L, 2, m, vq.CENTROIDS, d // m)
        else:
            want = -(-vq.TRAIN_VECTORS // (H * K))  # references needed for the sample
            idx = np.unique(np.linspace(0, self.n_refs - 1, min(self.n_refs, want)).round().astype(np.int64))
            kv, pos = self._spooled(idx)
            valid = (pos >= 0)[:, 0]  # (n, H, K): the same slots are empty in every layer
            sample = kv.permute(1, 2, 0, 3, 4, 5)[:, :, valid]  # (L, 2, n_valid, d)
            books = vq.train(sample[:, :, : vq.TRAIN_VECTORS].to(self.device), m).cpu()
        with open(self.spool / "kv.data.vq", "wb") as out:
            for start in range(0, self.n_refs, 256):
                kv, _ = self._spooled(np.arange(start, min(start + 256, self.n_refs)))
                codes = vq.encode(kv.to(self.device), books.to(self.device)).cpu()
                out.write(codes.numpy().tobytes())
        (self.spool / VQ_SECTION).write_bytes(books.numpy().astype("<f4").tobytes())
        size = (self.spool / VQ_SECTION).stat().st_size
        return [(VQ_SECTION, self.spool / VQ_SECTION, "raw", size)]

    def checkpoint(self, progress: dict) -> None:
        """Make everything written so far durable; `progress` comes back as `resumed` on resume.
        Only between documents."""
        if self.in_document:
            raise RuntimeError("checkpoint inside a document")
        sizes = {}
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            sizes[name] = f.tell()
        state = {
            "key": self._key,
            "sizes": sizes,
            "n_refs": self.n_refs,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "text_bytes": self._text_bytes,
            "doc_bytes": self._doc_bytes,
            "progress": progress,
        }
        tmp = self.spool / (self.STATE + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.spool / self.STATE)

    def finish(self) -> Path:
        """Assemble preamble, table, header and sections into a temp file; rename onto the target."""
        if self.in_document:
            raise RuntimeError("finish inside a document")
        for f in self._files.values():
            f.close()
        final_bytes = record_bytes(self.codec, self.shape, getattr(self, "subquantizers", None))
        header = {
            **self.header,
            "m3.format": "m3bank",
            "m3.bank.references": self.n_refs,
            "m3.bank.documents": self.n_docs,
            "m3.bank.tokens": self.n_tokens,
            "m3.memory.codec": self.codec,
            "m3.memory.record_bytes": final_bytes,
        }
        sections = []
        extra = []
        if self.codec == "vq":
            extra = self._quantize()
        for name in KNOWN_SECTIONS:
            spool = self.spool / name
            codec = "raw"
            if name == "docs.strings":  # small, read whole: compress
                size = spool.stat().st_size
                spool, codec = packed_docs_strings(spool)  # the spool itself stays resumable
                sections.append((name, spool, codec, size))
            elif name == "kv.data" and self.codec == "vq":
                sections.append((name, self.spool / "kv.data.vq", codec, (self.spool / "kv.data.vq").stat().st_size))
            else:
                sections.append((name, spool, codec, spool.stat().st_size))
        try:
            write_bank_file(self.path, header, sections + extra)
            shutil.rmtree(self.spool, ignore_errors=True)
        finally:
            self._release()
        return self.path


def packed_docs_strings(spool: Path) -> tuple[Path, str]:
    """The `docs.strings` section to store from the spool file holding it: a zstd frame beside it
    (`<spool>.zst`, codec "zstd"), or the spool itself (codec "raw") when compressing does not pay
    or would expand more than readers accept (MAX_ZSTD_RATIO)."""
    import zstandard

    raw = spool.read_bytes()
    packed = zstandard.ZstdCompressor(level=10).compress(raw)
    if len(packed) < len(raw) and len(raw) <= MAX_ZSTD_RATIO * len(packed):
        out = spool.with_name(spool.name + ".zst")
        out.write_bytes(packed)
        return out, "zstd"
    return spool, "raw"


def write_bank_file(path: Path, header: dict, sections: list[tuple]) -> None:
    """Lay out a bank from section files [(name, file, codec, decoded_length[, flags])], atomically,
    after checking the result reads back (check_written). `file` may be (file, offset, length): a
    range of another file (a bank being rewritten)."""
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise M3Error("bank header too large")
    count = len(sections)
    header_off = PREAMBLE_SIZE + count * SECTION_ENTRY_SIZE  # the table sits right after the preamble
    offset = _align(header_off + len(header_bytes))
    with output_lock(path), atomic_file(path, validate=check_written) as out:
        out.write(b"\0" * offset)
        entries = []
        for name, spool, codec, decoded, *rest in sections:
            section_flags = rest[0] if rest else SECTION_FLAG_REQUIRED
            h = hashlib.sha256()
            length = 0
            out.seek(offset)
            source, start, size = spool if isinstance(spool, tuple) else (spool, 0, None)
            with open(source, "rb") as f:
                f.seek(start)
                while chunk := f.read(1 << 22 if size is None else min(1 << 22, size - length)):
                    h.update(chunk)
                    out.write(chunk)
                    length += len(chunk)
            if size is not None and length != size:
                raise M3Error(f"{source} changed while it was being rewritten; try again")
            entries.append(
                _ENTRY.pack(
                    name.encode("ascii"),
                    offset,
                    length,
                    decoded,
                    codec.encode("ascii"),
                    section_flags,
                    b"\0" * 28,
                    h.digest(),
                )
            )
            offset = _align(offset + length)
        out.truncate(max(offset, out.tell()))
        table = b"".join(entries)
        out.seek(0)
        minor = _minor(header, [entry[0] for entry in sections])
        out.write(_preamble(PREAMBLE_SIZE, table, header_bytes, minor) + table + header_bytes)


def check_written(path: Path) -> None:
    """What a writer is about to publish passes the reader's own validation (structure, every
    checksum and record, the index), or the write fails and the target is left as it was."""
    from .retrieval import index_problems

    try:
        with Bank(path) as bank:
            problems = bank.verify(allow_empty=True) or index_problems(bank)
    except M3Error as e:
        problems = [str(e)]
    if problems:
        raise M3Error(f"refusing to write a bank m3 would not read back: {problems[0]}")


def _minor(header: dict, names) -> int:
    """The lowest minor version that describes a file: 2 once it has appended segments or removed
    documents, else 1 (so a bank that needs nothing newer still opens in m3 0.2)."""
    return 2 if "m3.bank.segments" in header or REMOVED_SECTION in names else 1


def _preamble(table_offset: int, table: bytes, header_bytes: bytes, minor: int = 1) -> bytes:
    assert minor <= MINOR
    head = struct.pack(
        "<8sHHIQQIII16s",
        MAGIC,
        MAJOR,
        minor,
        0,
        table_offset,
        len(header_bytes),
        len(table) // SECTION_ENTRY_SIZE,
        zlib.crc32(table),
        zlib.crc32(header_bytes),
        b"\0" * 16,
    )
    return head + struct.pack("<I", zlib.crc32(head))


_COUNT_KEYS = ("m3.bank.references", "m3.bank.documents", "m3.bank.tokens")


def merge_interleaved(
    parts: list[Path],
    out: Path,
    overwrite: bool = False,
    codec: str | None = None,
    vq_subquantizers: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Merge shard banks whose documents were dealt round-robin (document i of the corpus is
    document i // W of part i % W) back into one bank in corpus order, copying records as stored.
    `codec="vq"` merges bf16 parts into a vq bank (codebooks are trained on the merged data)."""
    banks = [Bank(p) for p in parts]
    try:
        first = banks[0]
        same = {k: v for k, v in first.header.items() if k not in _COUNT_KEYS}
        for b in banks[1:]:
            if {k: v for k, v in b.header.items() if k not in _COUNT_KEYS} != same:
                raise BankError(f"{b.path} was not written with the same model and settings as {first.path}")
        header = {
            k: v
            for k, v in same.items()
            if not k.startswith("m3.bank.")
            and k != "m3.format"
            and k not in ("m3.memory.codec", "m3.memory.record_bytes")
        }
        total = sum(b.n_docs for b in banks)
        codec = codec or first.codec
        if first.codec == "vq" or (codec != first.codec and not (codec == "vq" and first.codec == "bf16")):
            raise BankError(f"cannot merge {first.codec} parts into a {codec} bank")
        with BankWriter(
            out,
            header,
            codec,
            first.memory_shape,
            overwrite=overwrite,
            vq_subquantizers=vq_subquantizers,
            device=device,
        ) as w:
            for i in range(total):
                b = banks[i % len(banks)]
                doc = b.document(i // len(banks))
                refs = []
                for r in range(doc.first_ref, doc.first_ref + doc.n_refs):
                    ref = b.reference(r)
                    refs.append((ref.text, ref.token_count, *b.records(r)))
                w.add_document(doc.id, doc.title, doc.source, refs)
            w.finish()
    finally:
        for b in banks:
            b.close()
    return out


COMPACT_FRACTION = 4  # an update rewrites the whole file once dead space would exceed 1/4 of the live bytes


def update_bank(
    path: Path,
    add: dict[str, bytes | Path | tuple[Path, int, int]],
    header_updates: dict,
    flags: int | dict[str, int] = 0,
    drop: tuple[str, ...] = (),
    check=None,
) -> None:
    """Add or replace sections and header keys of an existing bank without rewriting the rest.

    The new sections, then a new section table and header, are appended at the end of the
    file and made durable, checked by the reader's own validation, and only then is the 64-byte
    preamble rewritten to point at the new table. Until that single write the file is the old,
    valid bank (trailing bytes are ignored); after it, the new one. Replaced sections become
    dead space; when it would exceed a quarter of the live bytes, the bank is instead rewritten
    whole (a new file renamed into place), so repeated re-indexing does not grow the file.

    add: section name -> its bytes, or a file or (file, offset, length) range holding them
    (streamed). flags: every added
    section's, or per name. drop: sections to leave out of the new table. check(bank) -> problems:
    what to read back before the switch (default: the embeddings and index); header keys set to
    None are removed.
    """
    import fcntl

    path = Path(os.path.realpath(path))  # a link to a bank updates the bank, whichever way
    sizes = {name: _size(data) for name, data in add.items()}
    flag_of = flags if isinstance(flags, dict) else dict.fromkeys(add, flags)
    with output_lock(path):
        with Bank(path) as bank:
            header = {**bank.header, **header_updates}
            header = {k: v for k, v in header.items() if v is not None}
            entries = [e for name, e in bank._entries.items() if name not in add and name not in drop]
            kept = [s for name, s in bank.sections.items() if name not in add and name not in drop]
            before = bytes(bank._mm[:PREAMBLE_SIZE])
            size = bank.size
        header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(header_bytes) > MAX_HEADER_BYTES:
            raise M3Error("bank header too large")
        if len(entries) + len(add) > MAX_SECTIONS:
            raise M3Error(f"a bank holds at most {MAX_SECTIONS} sections")
        for name in add:
            if not _NAME_RE.match(name):
                raise ValueError(f"invalid section name {name!r}")
        table_bytes = (len(entries) + len(add)) * SECTION_ENTRY_SIZE
        added = sum(_align(n) for n in sizes.values())
        live = PREAMBLE_SIZE + sum(_align(s.length) for s in kept) + added + table_bytes + len(header_bytes)
        grown = _align(size) + added + table_bytes + len(header_bytes)
        if (grown - live) * COMPACT_FRACTION > live:
            _rewrite(path, kept, add, header, flag_of)
            return
        try:
            f = open(path, "r+b")
        except OSError as e:
            raise M3Error(f"cannot update {path}: {e.strerror}") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if f.read(PREAMBLE_SIZE) != before:
                raise M3Error(f"{path} changed while it was being updated; try again")
            try:
                offset = _align(f.seek(0, os.SEEK_END))
                for name, data in add.items():
                    f.seek(offset)
                    digest = _write_section(f, data)
                    entries.append(
                        _ENTRY.pack(
                            name.encode("ascii"),
                            offset,
                            sizes[name],
                            sizes[name],
                            b"raw",
                            flag_of[name],
                            b"\0" * 28,
                            digest,
                        )
                    )
                    offset = _align(offset + sizes[name])
                table = b"".join(entries)
                f.seek(offset)
                f.write(table + header_bytes)
                f.flush()
                os.fsync(f.fileno())
                minor = _minor(header, [*(s.name for s in kept), *add])
                preamble = _preamble(offset, table, header_bytes, minor)
                _check_updated(path, preamble, check)
                crash_point("update:appended")
            except BaseException:
                f.truncate(size)  # the old bank, exactly: its preamble was never touched
                raise
            f.seek(0)
            f.write(preamble)
            f.flush()
            os.fsync(f.fileno())
            crash_point("update:switched")


def _size(data: bytes | Path | tuple[Path, int, int]) -> int:
    if isinstance(data, bytes):
        return len(data)
    return data[2] if isinstance(data, tuple) else data.stat().st_size


def _write_section(f, data: bytes | Path | tuple[Path, int, int]) -> bytes:
    """Write a section's bytes (or a file's or a file range's, streamed) at f's position; their
    SHA-256."""
    if isinstance(data, bytes):
        f.write(data)
        return hashlib.sha256(data).digest()
    source, start, size = data if isinstance(data, tuple) else (data, 0, data.stat().st_size)
    h = hashlib.sha256()
    done = 0
    with open_existing(source, "rb") as src:
        src.seek(start)
        while done < size and (chunk := src.read(min(1 << 22, size - done))):
            h.update(chunk)
            f.write(chunk)
            done += len(chunk)
    if done != size:
        raise M3Error(f"{source} changed while it was being copied; try again")
    return h.digest()


def _check_updated(path: Path, preamble: bytes, check=None) -> None:
    from .retrieval import index_problems

    try:  # the new table and header, and what they add; the untouched sections are as they were
        with Bank(path, preamble=preamble) as bank:
            problems = (check or index_problems)(bank)
    except M3Error as e:
        problems = [str(e)]
    if problems:
        raise M3Error(f"refusing to update {path} into a bank m3 would not read back: {problems[0]}")


def _rewrite(
    path: Path, kept: list, add: dict[str, bytes | Path | tuple[Path, int, int]], header: dict, flags: dict[str, int]
) -> None:
    """Write the kept sections (copied from the old file, as stored) and the added ones into a new
    file; rename it into place."""
    import tempfile

    make_parent(path)
    with tempfile.TemporaryDirectory(prefix=f".{Path(path).name}.sections-", dir=Path(path).parent) as tmp:
        sections = [(s.name, (Path(path), s.offset, s.length), s.codec, s.decoded_length, s.flags) for s in kept]
        for name, data in add.items():
            part: Path | tuple[Path, int, int]
            if isinstance(data, bytes):
                part = Path(tmp) / name
                part.write_bytes(data)
            else:
                part = data
            sections.append((name, part, "raw", _size(data), flags[name]))
        write_bank_file(path, header, sections)
