"""The `.m3bank` file: its constants and the reader (memory-mapped, bounds-checked). Writing
lives in bank_writer.py, the KV codecs in codecs.py.

`format_spec.md` is the contract; the constants below are checked against it by a test.
Knows the byte layout; knows nothing about models, tokenizers or corpora.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch

from .codecs import CODECS, decode_kv, encode_kv, record_bytes  # noqa: F401 (encode_kv: the writer's)
from .errors import BankError, M3Error

MAGIC = b"\x89M3BANK\n"
MAJOR = 1
MINOR = 2  # the newest minor this m3 reads; a writer writes the lowest one that describes its file
PREAMBLE_SIZE = 64
SECTION_ENTRY_SIZE = 128
MAX_SECTIONS = 256
MAX_HEADER_BYTES = 16 * 1024 * 1024
ALIGNMENT = 64
REF_RECORD_SIZE = 32
DOC_RECORD_SIZE = 32
SECTION_FLAG_REQUIRED = 1

SECTION_CODECS = ("raw", "zstd")
KNOWN_SECTIONS = ("refs.table", "refs.text", "docs.table", "docs.strings", "kv.data", "kv.positions")
VQ_SECTION = "codec.vq"  # PQ codebooks, present with the vq codec
ZSTD_SECTIONS = ("docs.strings",)  # the only section that may be compressed (read whole)
SEGMENT_SECTIONS = KNOWN_SECTIONS + ("emb.data", "index.faiss")  # what an appended segment may hold
REMOVED_SECTION = "docs.removed"  # 1.2: sorted u32 indices of removed documents
MAX_SEGMENTS = 24  # appended segments (`m3 add`) before the bank must be compacted
_SEGMENT_RE = re.compile(r"^s([1-9][0-9]{0,2})\.(.+)$")
MAX_ZSTD_RATIO = 64
MAX_RECORD_BYTES = 1 << 26  # one reference's kv.data record (the paper's 2.4B model: 440 KiB in bf16)
MAX_INDEX_PARAM = 65536  # m3.index.nprobe and m3.index.ef_search
MAX_EMBED_DIM = 65536
MAX_PROBLEMS = 100  # verify() stops after this many
_NAME_RE = re.compile(r"^[a-z0-9._-]{1,32}$")
_EMBEDDER_RE = re.compile(r"^(minilm|self|hf:.{1,255}|static:.{1,255})$", re.S)
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_PREAMBLE = struct.Struct("<8sHHIQQIII16sI")  # magic, major, minor, flags, hdr off, hdr len, count, crcs, pad, crc
_ENTRY = struct.Struct("<32sQQQ8sI28s32s")
_REF = struct.Struct("<QIIII8s")
_DOC = struct.Struct("<QIIIIII")
assert _PREAMBLE.size == PREAMBLE_SIZE and _ENTRY.size == SECTION_ENTRY_SIZE
assert _REF.size == REF_RECORD_SIZE and _DOC.size == DOC_RECORD_SIZE


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# --- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    name: str
    offset: int
    length: int
    decoded_length: int
    codec: str
    flags: int
    sha256: bytes


@dataclass(frozen=True)
class Segment:
    """A run of references and documents stored in their own sections: the base (number 0, the
    sections named as in 1.0) or a segment appended by `m3 add` (number k, sections `s<k>.*`)."""

    number: int
    first_ref: int
    n_refs: int
    first_doc: int
    n_docs: int
    part: int = 0  # the file holding it: 0 for a bank, the shard's place in a bank set
    local: int = -1  # its number inside that file (-1: `number`)
    ref_base: int = 0  # added to the reference and document numbers its records store (a
    doc_base: int = 0  # shard's records count from its own start; a bank's from the bank's)

    @property
    def prefix(self) -> str:
        k = self.number if self.local < 0 else self.local
        return f"s{k}." if k else ""


def segment_name(name: str) -> tuple[int, str]:
    """`s3.kv.data` -> (3, "kv.data"); a base section -> (0, name)."""
    m = _SEGMENT_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (0, name)


@dataclass(frozen=True)
class Reference:
    index: int
    text: str
    token_count: int
    doc_index: int
    index_in_doc: int


@dataclass(frozen=True)
class Document:
    index: int
    id: str
    title: str
    source: str
    first_ref: int
    n_refs: int


@overload
def _int(header: dict, key: str, lo: int = 0, hi: int = 2**63, optional: Literal[False] = False) -> int: ...
@overload
def _int(header: dict, key: str, lo: int = 0, hi: int = 2**63, *, optional: Literal[True]) -> int | None: ...
def _int(header: dict, key: str, lo: int = 0, hi: int = 2**63, optional: bool = False) -> int | None:
    v = header.get(key)
    if optional and key not in header:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BankError(f"header key {key} is missing or out of range ({str(v)[:40]!r}; allowed {lo}..{hi})")
    return v


class Bank:
    """A read-only, memory-mapped .m3bank. Opening validates the structure (see format_spec.md
    "Reading rules"); `verify()` also recomputes checksums and checks every record."""

    is_set = False  # a bank set (bankset.py): shards and a manifest, read as one bank

    def __new__(cls, path: Path, preamble: bytes | None = None):
        if cls is Bank and os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
            from .bankset import BankSet

            return super().__new__(BankSet)
        return super().__new__(cls)

    def __init__(self, path: Path, preamble: bytes | None = None) -> None:
        """`preamble`: read the file as if its first 64 bytes were these (a writer checking a new
        section table before it switches the file over to it)."""
        self.path = Path(path)
        self._preamble_override = preamble
        if not self.path.exists():
            raise M3Error(f"bank {self.path} does not exist")
        if not self.path.is_file():
            raise M3Error(f"{self.path} is not a file")
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:  # unreadable, or out of file descriptors
            raise M3Error(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self.size = os.fstat(self._fh.fileno()).st_size
            if self.size < PREAMBLE_SIZE:
                raise BankError(f"{self.path} is too short to be an .m3bank ({self.size} bytes)")
            try:
                self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise M3Error(f"cannot map {self.path}: {e.strerror}") from None
            self._parse()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # numpy views still alive; the OS unmaps at exit
                pass
        self._fh.close()

    def __enter__(self) -> "Bank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # structure -------------------------------------------------------------------------------
    def _parse(self) -> None:
        mm, size = self._mm, self.size
        pre = self._preamble_override or mm[:PREAMBLE_SIZE]
        magic, major, minor, flags, toff, hlen, count, table_crc, header_crc, _pad, pre_crc = _PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise BankError(f"{self.path} is not an .m3bank (bad magic)")
        if major != MAJOR:
            raise BankError(f"{self.path} is .m3bank version {major}.{minor}; this m3 reads version {MAJOR}.x")
        if zlib.crc32(pre[:60]) != pre_crc:
            raise BankError("preamble checksum mismatch (file damaged)")
        if flags:
            raise BankError(f"unknown file flags 0x{flags:x} (written by a newer m3?)")
        self.version = (major, minor)
        if count > MAX_SECTIONS:
            raise BankError(f"section count {count} exceeds {MAX_SECTIONS}")
        if toff % ALIGNMENT or toff < PREAMBLE_SIZE or toff + count * SECTION_ENTRY_SIZE > size:
            raise BankError(f"section table offset {toff} is out of bounds for a {size}-byte file")
        hoff = toff + count * SECTION_ENTRY_SIZE
        if not 1 <= hlen <= MAX_HEADER_BYTES or hoff + hlen > size:
            raise BankError(f"header length {hlen} is out of bounds for a {size}-byte file")
        self.table_offset = toff
        table = mm[toff:hoff]
        if zlib.crc32(table) != table_crc:
            raise BankError("section table checksum mismatch (file damaged)")
        header_bytes = mm[hoff : hoff + hlen]
        if zlib.crc32(header_bytes) != header_crc:
            raise BankError("header checksum mismatch (file damaged)")
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, huge integers, deep nesting
            raise BankError(f"header is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(header, dict) or header.get("m3.format") != "m3bank":
            raise BankError("header is not an m3bank header")
        self.header = header
        self.sections: dict[str, Section] = {}
        self._entries: dict[str, bytes] = {}
        spans = [(0, PREAMBLE_SIZE, "preamble"), (toff, hoff + hlen, "section table and header")]
        for i in range(count):
            raw_name, off, length, decoded, codec, sflags, _res, digest = _ENTRY.unpack_from(
                table, i * SECTION_ENTRY_SIZE
            )
            name = raw_name.rstrip(b"\0").decode("ascii", "replace")
            codec_s = codec.rstrip(b"\0").decode("ascii", "replace")
            if not _NAME_RE.match(name) or name in self.sections:
                raise BankError(f"invalid or duplicate section name {name!r}")
            if off % ALIGNMENT or off < PREAMBLE_SIZE or off + length > size:
                raise BankError(f"section {name} (offset {off}, length {length}) lies outside the file")
            if codec_s not in SECTION_CODECS:
                raise BankError(f"section {name} uses unknown codec {codec_s!r}")
            if codec_s == "raw" and decoded != length:
                raise BankError(f"section {name}: raw section with decoded length {decoded} != {length}")
            number, base_name = segment_name(name)
            if codec_s == "zstd" and (base_name not in ZSTD_SECTIONS or decoded > MAX_ZSTD_RATIO * max(length, 1)):
                raise BankError(
                    f"section {name}: zstd is not allowed here or expands implausibly ({length} -> {decoded} bytes)"
                )
            known = (
                name in KNOWN_SECTIONS
                or name in (VQ_SECTION, REMOVED_SECTION)
                or (number and base_name in SEGMENT_SECTIONS)
            )
            if not known and sflags & SECTION_FLAG_REQUIRED:
                raise BankError(f"required section {name!r} is unknown to this m3 (upgrade m3)")
            if length:
                spans.append((off, off + length, name))
            self.sections[name] = Section(name, off, length, decoded, codec_s, sflags, digest)
            self._entries[name] = bytes(table[i * SECTION_ENTRY_SIZE : (i + 1) * SECTION_ENTRY_SIZE])
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise BankError(f"sections {an} and {bn} overlap")
        missing = [n for n in KNOWN_SECTIONS if n not in self.sections]
        if missing:
            raise BankError(f"required sections missing: {', '.join(missing)}")
        self._check_geometry()

    def _check_geometry(self) -> None:
        h = self.header
        self.n_refs = _int(h, "m3.bank.references", 0, 2**40)
        self.n_docs = _int(h, "m3.bank.documents", 0, 2**32 - 1)
        self.codec: str = h.get("m3.memory.codec")  # type: ignore[assignment]  # checked just below
        if self.codec not in CODECS:
            raise BankError(f"unknown KV codec {self.codec!r} in the header")
        self.memory_shape = (
            _int(h, "m3.memory.layers", 1, 4096),
            2,
            _int(h, "m3.memory.kv_heads", 1, 4096),
            _int(h, "m3.memory.top_k", 1, 4096),
            _int(h, "m3.memory.head_dim", 1, 4096),
        )
        self.record_bytes = _int(h, "m3.memory.record_bytes", 1, MAX_RECORD_BYTES)
        self.subquantizers: int | None = None
        if self.codec == "vq":
            self.subquantizers = _int(h, "m3.memory.vq.subquantizers", 1, 4096)
            if self.memory_shape[4] % self.subquantizers:
                raise BankError("m3.memory.vq.subquantizers does not divide the head dim")
            if VQ_SECTION not in self.sections:
                raise BankError(f"a vq bank needs the {VQ_SECTION} section")
            from .vq import CENTROIDS

            n = self.memory_shape[0] * 2 * CENTROIDS * self.memory_shape[4] * 4
            if self.sections[VQ_SECTION].decoded_length != n or self.sections[VQ_SECTION].codec != "raw":
                raise BankError(f"section {VQ_SECTION} has {self.sections[VQ_SECTION].length} bytes, expected {n}")
        if self.record_bytes != record_bytes(self.codec, self.memory_shape, self.subquantizers):
            raise BankError("m3.memory.record_bytes does not match codec and memory shape")
        self.reference_length = _int(h, "m3.memory.reference_length", 1, 2**16)
        lists: tuple[tuple[str, int | None], ...] = (
            ("m3.memory.layer_ids", self.memory_shape[0]),
            ("m3.model.reference_prefix_ids", None),
        )
        for key, want in lists:
            v = h.get(key)
            if (
                not isinstance(v, list)
                or (want is not None and len(v) != want)
                or len(v) > 4096
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31 for x in v)
            ):
                raise BankError(f"header key {key} must be a list of {want or 'some'} non-negative integers")
        self.prefix_length = len(h["m3.model.reference_prefix_ids"])
        ids = h["m3.memory.layer_ids"]
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise BankError(f"header key m3.memory.layer_ids must be strictly increasing, got {ids[:8]}")
        theta = h.get("m3.model.rope_theta", 10000.0)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise BankError(f"header key m3.model.rope_theta must be a finite positive number, got {theta!r}")
        check_retrieval_keys(h)
        _int(h, "m3.index.count", 0, 2**40, optional=True)
        _int(h, "m3.bank.tokens", 0, 2**63, optional=True)
        for key in (
            "m3.model.fingerprint",
            "m3.model.hint",
            "m3.embed.hint",
            "m3.embed.name",
            "m3.embed.pooling",
            "m3.embed.fingerprint",
            "m3.index.factory",
            "m3.index.metric",
        ):
            if key in h and not isinstance(h[key], str):
                raise BankError(f"header key {key} must be a string")
        self._parse_segments()
        L, _, H, K, _d = self.memory_shape
        for seg in self.segments:
            expect = {
                "refs.table": seg.n_refs * REF_RECORD_SIZE,
                "docs.table": seg.n_docs * DOC_RECORD_SIZE,
                "kv.data": seg.n_refs * self.record_bytes,
                "kv.positions": seg.n_refs * L * H * K * 2,
            }
            for base_name, n in expect.items():
                name = seg.prefix + base_name
                if self.sections[name].decoded_length != n or self.sections[name].codec != "raw":
                    raise BankError(f"section {name} has {self.sections[name].length} bytes, the header implies {n}")
            for base_name in ("refs.text", "docs.strings"):
                if self.sections[seg.prefix + base_name].decoded_length > 2**40:
                    raise BankError(f"section {seg.prefix + base_name} is implausibly large")
        self._parse_removed()
        self._docs_strings: dict[int, bytes] = {}
        self._codebooks: torch.Tensor | None = None

    def _parse_segments(self) -> None:
        """The base and the segments `m3 add` appended (header `m3.bank.segments`, 1.2): each a run
        of references and documents numbered after those before it."""
        listed = self.header.get("m3.bank.segments", [])
        if not isinstance(listed, list) or len(listed) > MAX_SEGMENTS:
            raise BankError(f"header key m3.bank.segments must be a list of at most {MAX_SEGMENTS} segments")
        counts = []
        for k, entry in enumerate(listed, 1):
            if not isinstance(entry, dict):
                raise BankError(f"header key m3.bank.segments: segment {k} is not an object")
            counts.append((_int(entry, "references", 1, self.n_refs), _int(entry, "documents", 1, self.n_docs)))
        base_refs = self.n_refs - sum(n for n, _ in counts)
        base_docs = self.n_docs - sum(d for _, d in counts)
        if base_refs < 0 or base_docs < 0 or (counts and (base_refs < 1 or base_docs < 1)):
            raise BankError(
                "header key m3.bank.segments counts as many references or documents as the bank has, or more"
            )
        segments = [Segment(0, 0, base_refs, 0, base_docs)]
        for k, (n, d) in enumerate(counts, 1):
            last = segments[-1]
            segments.append(Segment(k, last.first_ref + last.n_refs, n, last.first_doc + last.n_docs, d))
        for name in self.sections:
            if segment_name(name)[0] > len(counts):
                raise BankError(f"section {name} belongs to no segment the header lists")
        missing = [
            seg.prefix + n for seg in segments[1:] for n in KNOWN_SECTIONS if seg.prefix + n not in self.sections
        ]
        if missing:
            raise BankError(f"required sections missing: {', '.join(missing[:6])}")
        self.segments = segments
        self._ref_starts = np.array([seg.first_ref for seg in segments], dtype=np.int64)
        self._doc_starts = np.array([seg.first_doc for seg in segments], dtype=np.int64)

    def _parse_removed(self) -> None:
        """`docs.removed` (1.2): the documents `m3 remove` took out, sorted, each once."""
        self.removed = np.zeros(0, dtype=np.int64)
        if REMOVED_SECTION not in self.sections:
            return
        s = self.sections[REMOVED_SECTION]
        if s.codec != "raw" or s.length % 4 or s.length > 4 * self.n_docs:
            raise BankError(f"section {REMOVED_SECTION} has {s.length} bytes: not a list of document numbers")
        removed = np.frombuffer(self.raw(REMOVED_SECTION), dtype="<u4").astype(np.int64)
        if removed.size and (removed[-1] >= self.n_docs or (np.diff(removed) <= 0).any()):
            raise BankError(f"section {REMOVED_SECTION} must list document numbers < {self.n_docs} in increasing order")
        self.removed = removed

    @property
    def _parts(self) -> "tuple[Bank, ...] | list[Bank]":
        """The files the segments live in: this one (a bank set: its shards)."""
        return (self,)

    @property
    def has_index(self) -> bool:
        """Whether the bank holds a retrieval index (`m3 index`)."""
        return "index.faiss" in self.sections

    def segment_of_ref(self, i: int) -> Segment:
        return self.segments[int(np.searchsorted(self._ref_starts, i, side="right")) - 1]

    def segment_of_doc(self, j: int) -> Segment:
        return self.segments[int(np.searchsorted(self._doc_starts, j, side="right")) - 1]

    def is_removed(self, doc: int) -> bool:
        """Whether `m3 remove` took document `doc` out (it is never retrieved again)."""
        k = int(np.searchsorted(self.removed, doc))
        return k < self.removed.size and int(self.removed[k]) == doc

    @property
    def live_docs(self) -> int:
        return self.n_docs - int(self.removed.size)

    @property
    def removed_refs(self) -> int:
        """References of removed documents (still stored until `m3 compact`)."""
        return sum(self.document(int(j)).n_refs for j in self.removed)

    def live_references(self):
        """Indices of the references of documents not removed, in order."""
        if not self.removed.size:
            return range(self.n_refs)
        keep = np.ones(self.n_refs, dtype=bool)
        for j in self.removed:
            d = self.document(int(j))
            keep[d.first_ref : d.first_ref + d.n_refs] = False
        return np.flatnonzero(keep).tolist()

    # access ----------------------------------------------------------------------------------
    def raw(self, name: str) -> memoryview:
        s = self.sections[name]
        return memoryview(self._mm)[s.offset : s.offset + s.length]

    def verified(self, name: str) -> bytes:
        """A section's stored bytes, after checking them against the table's SHA-256: the only way
        bytes reach a decompressor, a deserializer or a codebook."""
        data = bytes(self.raw(name))
        if hashlib.sha256(data).digest() != self.sections[name].sha256:
            raise BankError(f"section {name}: SHA-256 mismatch (file damaged)")
        return data

    def decoded(self, name: str) -> bytes:
        """A whole section, decoded (for small sections)."""
        s = self.sections[name]
        if s.codec == "raw":
            return bytes(self.raw(name))
        import zstandard

        data = self.verified(name)
        try:
            declared = zstandard.get_frame_parameters(data).content_size
            if declared != s.decoded_length:
                raise BankError(
                    f"section {name}: the zstd frame declares {declared} bytes, the table {s.decoded_length}"
                )
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=s.decoded_length)
        except zstandard.ZstdError as e:
            raise BankError(f"section {name} does not decompress: {e}") from None
        if len(out) != s.decoded_length:
            raise BankError(f"section {name} decompresses to {len(out)} bytes, table says {s.decoded_length}")
        return out

    def _index(self, i: int, n: int, what: str) -> int:
        if not isinstance(i, int) or not 0 <= i < n:
            raise M3Error(f"{what} {i} is out of range (the bank has {n})")
        return i

    def reference(self, i: int) -> Reference:
        i = self._index(i, self.n_refs, "reference")
        seg = self.segment_of_ref(i)
        f = self._parts[seg.part]
        off, length, tokens, doc, idx, _ = _REF.unpack_from(
            f._mm, f.sections[seg.prefix + "refs.table"].offset + (i - seg.first_ref) * REF_RECORD_SIZE
        )
        text_sec = f.sections[seg.prefix + "refs.text"]
        doc += seg.doc_base
        if (
            off + length > text_sec.length
            or not seg.first_doc <= doc < seg.first_doc + seg.n_docs
            or tokens > self.reference_length
        ):
            raise BankError(f"reference {i} has an invalid record (text {off}+{length}, doc {doc}, tokens {tokens})")
        try:
            text = bytes(f._mm[text_sec.offset + off : text_sec.offset + off + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise BankError(f"reference {i}: text is not valid UTF-8") from None
        return Reference(i, text, tokens, doc, idx)

    def document(self, j: int) -> Document:
        j = self._index(j, self.n_docs, "document")
        seg = self.segment_of_doc(j)
        f = self._parts[seg.part]
        if seg.number not in self._docs_strings:
            self._docs_strings[seg.number] = f.decoded(seg.prefix + "docs.strings")
        off, li, lt, ls, first, n, _ = _DOC.unpack_from(
            f._mm, f.sections[seg.prefix + "docs.table"].offset + (j - seg.first_doc) * DOC_RECORD_SIZE
        )
        blob = self._docs_strings[seg.number]
        first += seg.ref_base
        if off + li + lt + ls > len(blob) or first < seg.first_ref or first + n > seg.first_ref + seg.n_refs:
            raise BankError(f"document {j} has an invalid record")
        try:
            parts = [
                blob[a:b].decode("utf-8")
                for a, b in ((off, off + li), (off + li, off + li + lt), (off + li + lt, off + li + lt + ls))
            ]
        except UnicodeDecodeError:
            raise BankError(f"document {j}: strings are not valid UTF-8") from None
        return Document(j, parts[0], parts[1], parts[2], first, n)

    def positions(self, indices) -> torch.Tensor:
        """(n, L, H, K) int16 positions; -1 = empty slot."""
        L, _, H, K, _ = self.memory_shape
        rows = self._gather("kv.positions", self._indices(indices), L * H * K * 2)
        return torch.from_numpy(rows.view("<i2").astype(np.int16).reshape(-1, L, H, K))

    def _gather(self, section: str, idx: np.ndarray, per: int) -> np.ndarray:
        """(len(idx), per) bytes: the fixed-size records of references `idx` in `section`, from
        whichever segments hold them."""
        out = np.empty((idx.size, per), dtype=np.uint8)
        where = np.searchsorted(self._ref_starts, idx, side="right") - 1
        for k in np.unique(where):
            seg = self.segments[int(k)]
            f = self._parts[seg.part]
            name = seg.prefix + section
            if name not in f.sections or f.sections[name].length != seg.n_refs * per:
                raise BankError(f"section {name} is missing or does not hold {seg.n_refs} records of {per} bytes")
            rows = np.frombuffer(f._mm, dtype=np.uint8, count=seg.n_refs * per, offset=f.sections[name].offset).reshape(
                seg.n_refs, per
            )
            mask = where == k
            out[mask] = rows[idx[mask] - seg.first_ref]
        return out

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_refs):
            raise M3Error(f"reference index out of range (the bank has {self.n_refs})")
        return idx

    def memories(self, indices, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """Decode the memories of `indices` -> MemoryEncoding (kv (n, L, 2, H, K, d), valid, positions)."""
        from .attention import MemoryEncoding

        idx = self._indices(indices)
        records = self._gather("kv.data", idx, self.record_bytes)
        pos = self.positions(idx).long()
        if self.codec == "vq":
            from . import vq

            L, two, H, K, d = self.memory_shape
            codes = torch.from_numpy(records).reshape(len(idx), L, two, H, K, self.record_bytes // (L * two * H * K))
            codes = codes.to(device)
            starts = np.searchsorted(self._ref_starts, idx, side="right") - 1
            part = np.array([s.part for s in self.segments], dtype=np.int64)[starts]
            if len(self._parts) == 1 or not part.size or (part == part[0]).all():
                kv = vq.decode(codes, self._parts[int(part[0]) if part.size else 0].codebooks().to(device))
            else:  # a bank set: each shard's codes name its own codebooks
                kv = torch.empty((len(idx), L, two, H, K, d), device=device)
                for j in np.unique(part):
                    rows = torch.from_numpy(np.flatnonzero(part == j)).to(device)
                    kv[rows] = vq.decode(codes[rows], self._parts[int(j)].codebooks().to(device))
        else:  # bf16 records asked for as bfloat16 are not converted
            kv = decode_kv(
                records, self.codec, self.memory_shape, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
            )
            kv = kv.to(device)
        valid = pos >= 0
        full = bool(valid.all())
        valid = valid.to(device)
        if not full:  # empty slots read as zero in every codec
            kv = torch.where(valid[:, :, None, :, :, None], kv, 0)
        return MemoryEncoding(kv=kv.to(dtype=dtype), valid=valid, positions=pos.to(device))

    def codebooks(self) -> torch.Tensor:
        """The vq codebooks (L, 2, M, 256, d/M), checksum-verified once before first use."""
        if self._codebooks is None:
            arr = np.frombuffer(self.verified(VQ_SECTION), dtype="<f4")
            L, _, _, _, d = self.memory_shape
            m = self.subquantizers
            assert m is not None  # a vq bank always has them (checked at open)
            self._codebooks = torch.from_numpy(arr.astype(np.float32)).reshape(L, 2, m, 256, d // m)
        return self._codebooks

    def records(self, i: int) -> tuple[bytes, bytes]:
        """Reference i's kv.data and kv.positions records, as stored."""
        i = self._index(i, self.n_refs, "reference")
        L, _, H, K, _ = self.memory_shape
        idx = np.array([i], dtype=np.int64)
        return (
            self._gather("kv.data", idx, self.record_bytes).tobytes(),
            self._gather("kv.positions", idx, L * H * K * 2).tobytes(),
        )

    def _release(self, offset: int, length: int) -> None:
        """Let the pages of a range read once go (a full pass over a large bank then stays within
        a few chunks of resident memory instead of the whole file)."""
        page = mmap.PAGESIZE
        start = offset // page * page
        end = min(-(-(offset + length) // page) * page, -(-self.size // page) * page)
        if hasattr(self._mm, "madvise") and end > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError, AttributeError):
                pass

    def drop_cache(self) -> None:
        """Evict the file's pages from this process's mapping and from the OS page cache (Linux,
        best effort), so the next reads come from the drive: a benchmark's cold cache."""
        self._release(0, self.size)
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def verify(self, progress=None, allow_empty: bool = False, segments: list[int] | None = None) -> list[str]:
        """Recompute every checksum and check every record; returns the problems found
        (bank_verify.py). allow_empty: a bank without references is not a problem (the part of a
        sharded encode whose share of the corpus was empty). segments: check only these segments'
        sections and records (what `m3 add` is about to publish)."""
        from .bank_verify import verify

        return verify(self, progress, allow_empty, segments)


def check_retrieval_keys(h: dict) -> None:
    """The m3.embed.* and m3.index.* header keys' types and ranges (a bank's header, or a bank
    set's index entry)."""
    for key in ("m3.index.nprobe", "m3.index.ef_search"):
        _int(h, key, 0, MAX_INDEX_PARAM, optional=True)  # 0: FAISS's default
    _int(h, "m3.embed.dim", 1, MAX_EMBED_DIM, optional=True)
    name = h.get("m3.embed.name")
    if name is not None and not (isinstance(name, str) and _EMBEDDER_RE.match(name)):
        raise BankError(
            f"header key m3.embed.name must be minilm, self, hf:<dir> or static:<dir>, got {str(name)[:40]!r}"
        )
    if h.get("m3.embed.pooling", "mean") not in ("mean", "cls"):
        raise BankError(f"header key m3.embed.pooling must be mean or cls, got {str(h['m3.embed.pooling'])[:40]!r}")
    for key in ("m3.model.fingerprint", "m3.embed.fingerprint"):
        if key in h and not (isinstance(h[key], str) and _FINGERPRINT_RE.match(h[key])):
            raise BankError(f"header key {key} must be sha256:<64 hex digits>, got {str(h[key])[:40]!r}")
    if h.get("m3.index.metric", "inner_product") != "inner_product":
        raise BankError(f"header key m3.index.metric must be inner_product, got {str(h['m3.index.metric'])[:40]!r}")
    _int(h, "m3.index.count", 0, 2**40, optional=True)
    for key in ("m3.embed.hint", "m3.embed.name", "m3.embed.pooling", "m3.embed.fingerprint", "m3.index.factory"):
        if key in h and not isinstance(h[key], str):
            raise BankError(f"header key {key} must be a string")


def geometry_problems(bank: Bank, cfg) -> list[str]:
    """How a bank's memories would not fit a model config (shape, layers, prefix, lengths)."""
    problems = []
    if tuple(bank.memory_shape) != tuple(cfg.memory_shape):
        problems.append(f"memories of shape {tuple(bank.memory_shape)}, the model reads {tuple(cfg.memory_shape)}")
    if list(bank.header["m3.memory.layer_ids"]) != list(cfg.mem_layers):
        problems.append(
            f"memory layers {bank.header['m3.memory.layer_ids'][:8]}, the model's are {list(cfg.mem_layers)[:8]}"
        )
    if list(bank.header["m3.model.reference_prefix_ids"]) != list(cfg.reference_prefix_ids):
        problems.append("a reference prefix other than the model's")
    if float(bank.header.get("m3.model.rope_theta", cfg.rope_theta)) != float(cfg.rope_theta):
        problems.append(f"rope_theta {bank.header.get('m3.model.rope_theta')}, the model's is {cfg.rope_theta}")
    if bank.reference_length != cfg.reference_length:
        problems.append(f"references of up to {bank.reference_length} tokens, the model's are {cfg.reference_length}")
    return problems


def require_geometry(bank: Bank, cfg) -> None:
    """Refuse a bank whose memories the model cannot read (checked before any memory is loaded)."""
    problems = geometry_problems(bank, cfg)
    if problems:
        raise BankError(f"{bank.path} does not fit this model: {problems[0]}; re-encode the corpus with it")


def require_same_model(bank: Bank, fingerprint: str, allow_mismatch: bool = False) -> None:
    """A bank belongs to exactly one model: refuse another one, naming both fingerprints."""
    recorded = bank.header.get("m3.model.fingerprint")
    if recorded != fingerprint and not allow_mismatch:
        raise M3Error(
            f"{bank.path} was encoded by model {recorded}, not by this model {fingerprint}; "
            "re-encode the corpus with this model"
        )
