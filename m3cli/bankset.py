"""Bank sets: a knowledge base stored as several `.m3bank` shard files in one directory with a
small manifest, written in parallel (one shard per process of `accelerate launch … m3 encode`)
and read as one bank: `Bank("kb.m3set")` returns a `BankSet`, whose references and documents
are numbered across the shards in manifest order, and whose one retrieval index (`m3 index`)
covers them all. format_spec.md ("Bank sets") is the contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .bank import MAJOR, MINOR, Bank, BankError, Segment
from .errors import M3Error

MANIFEST = "manifest.json"
SET_FORMAT = "m3bankset"
SET_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 24
MAX_SHARDS = 4096
_SHARD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.m3bank$")
_INDEX_RE = re.compile(r"^index-[0-9a-f]{16}\.faiss$")
# header keys that may differ between shards (counts, and each shard's own embeddings' description)
_PER_SHARD = ("m3.bank.", "m3.embed.", "m3.index.", "m3.encode.")


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.m3bank"


def is_set_path(path: Path | str) -> bool:
    """An output or bank named `*.m3set` (a directory) is a bank set."""
    return str(path).rstrip("/").endswith(".m3set")


def read_manifest(path: Path) -> dict:
    """The manifest of the set at `path`, checked for shape (not yet against its shards)."""
    mpath = Path(path) / MANIFEST
    try:
        with open(mpath, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise M3Error(f"cannot read {mpath}: {e.strerror}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BankError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise BankError(f"{mpath} is not valid JSON") from None
    if not isinstance(m, dict) or m.get("format") != SET_FORMAT:
        raise BankError(f"{mpath} is not a bank-set manifest")
    if m.get("version") != SET_VERSION:
        raise BankError(f"{mpath} is bank-set version {m.get('version')!r}; this m3 reads version {SET_VERSION}")
    shards = m.get("shards")
    if not isinstance(shards, list) or not 1 <= len(shards) <= MAX_SHARDS:
        raise BankError(f"{mpath}: shards must be a list of 1..{MAX_SHARDS} entries")
    names = set()
    for entry in shards:
        ok = isinstance(entry, dict) and isinstance(entry.get("file"), str) and _SHARD_RE.match(entry["file"])
        for key in ("references", "documents"):
            v = entry.get(key) if isinstance(entry, dict) else None
            ok = ok and isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**32
        if not ok or entry["file"] in names:
            raise BankError(f"{mpath}: a shard entry is not {{file: NAME.m3bank, references ≥ 1, documents ≥ 1}}")
        names.add(entry["file"])
    index = m.get("index")
    if index is not None:
        ok = isinstance(index, dict) and isinstance(index.get("file"), str) and _INDEX_RE.match(index["file"])
        ok = ok and isinstance(index.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", index["sha256"])
        ok = ok and isinstance(index.get("header"), dict)
        ok = ok and all(isinstance(k, str) and k.startswith(("m3.embed.", "m3.index.")) for k in index["header"])
        if not ok:
            raise BankError(f"{mpath}: the index entry is not {{file: index-<16 hex>.faiss, sha256, header}}")
    return m


class BankSet(Bank):
    """A bank set opened for reading: the shards' segments in manifest order, one header, one
    index. Writing goes through `encoding.encode_corpus` and `index_set`; `m3 add`/`remove`/
    `compact` work on single banks only."""

    is_set = True

    def __init__(self, path: Path, preamble: bytes | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._parts = []
        self._mm = None
        try:
            for entry in self.manifest["shards"]:
                self._parts.append(Bank(self.path / entry["file"]))
            self._join()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for shard in getattr(self, "_parts", []):
            shard.close()

    def _join(self) -> None:
        first = self._parts[0]
        same = {k: v for k, v in first.header.items() if not k.startswith(_PER_SHARD)}
        segments: list[Segment] = []
        refs = docs = tokens = 0
        removed = []
        for j, (shard, entry) in enumerate(zip(self._parts, self.manifest["shards"])):
            name = entry["file"]
            if {k: v for k, v in shard.header.items() if not k.startswith(_PER_SHARD)} != same:
                raise BankError(f"shard {name} was not encoded by the same model with the same settings as the first")
            if shard.codec != first.codec or shard.record_bytes != first.record_bytes:
                raise BankError(f"shard {name} uses another codec than the first")
            if (shard.n_refs, shard.n_docs) != (entry["references"], entry["documents"]):
                raise BankError(
                    f"shard {name} holds {shard.n_refs} references, the manifest says {entry['references']}"
                )
            for seg in shard.segments:
                segments.append(
                    Segment(
                        len(segments),
                        refs + seg.first_ref,
                        seg.n_refs,
                        docs + seg.first_doc,
                        seg.n_docs,
                        part=j,
                        local=seg.number,
                        ref_base=refs,
                        doc_base=docs,
                    )
                )
            removed.append(shard.removed + docs)
            refs += shard.n_refs
            docs += shard.n_docs
            tokens += int(shard.header.get("m3.bank.tokens", 0))
        if refs >= 2**40:
            raise BankError("the shards hold more than 2^40 references")
        self.segments = segments
        self._ref_starts = np.array([s.first_ref for s in segments], dtype=np.int64)
        self._doc_starts = np.array([s.first_doc for s in segments], dtype=np.int64)
        self.removed = np.concatenate(removed)
        index = self.manifest.get("index")
        self.header = {
            **same,
            "m3.format": "m3bank",
            "m3.bank.references": refs,
            "m3.bank.documents": docs,
            "m3.bank.tokens": tokens,
            **(index["header"] if index else {}),
        }
        self.n_refs, self.n_docs = refs, docs
        self.version = (MAJOR, MINOR)
        self.codec, self.memory_shape, self.record_bytes = first.codec, first.memory_shape, first.record_bytes
        self.subquantizers, self.reference_length = first.subquantizers, first.reference_length
        self.prefix_length = first.prefix_length
        self.sections = {}  # a set has no sections of its own: its shards do
        self._entries = {}
        self.size = sum(s.size for s in self._parts)
        self._docs_strings = {}
        self._codebooks = None
        if index is not None:
            dim = index["header"].get("m3.embed.dim")
            if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 65536:
                raise BankError(f"{self.path / MANIFEST}: the index header needs m3.embed.dim")

    @property
    def has_index(self) -> bool:
        return self.manifest.get("index") is not None

    @property
    def shard_paths(self) -> list[Path]:
        return [s.path for s in self._parts]

    def index_bytes(self) -> bytes:
        """The set's index file, after checking its SHA-256 against the manifest."""
        entry = self.manifest["index"]
        path = self.path / entry["file"]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BankError(f"the index {path} named by the manifest cannot be read: {e.strerror}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BankError(f"{path}: SHA-256 mismatch (file damaged or replaced)")
        return data

    def codebooks(self):
        return self._parts[0].codebooks()

    def drop_cache(self) -> None:
        for shard in self._parts:
            shard.drop_cache()


def write_manifest(path: Path, shards: list[Path], index: dict | None = None) -> None:
    """Write (atomically) the manifest of the set at `path` naming `shards` in order, with their
    counts read from the files; shards without references are left out (and deleted)."""
    from .atomic import write_text_atomic

    entries = []
    for shard in shards:
        with Bank(shard) as b:
            n_refs, n_docs = b.n_refs, b.n_docs
        if n_refs == 0:
            shard.unlink()
            continue
        entries.append({"file": shard.name, "references": n_refs, "documents": n_docs})
    if not entries:
        raise M3Error(f"the set {path} would hold no references")
    manifest = {"format": SET_FORMAT, "version": SET_VERSION, "shards": entries}
    if index is not None:
        manifest["index"] = index
    write_text_atomic(Path(path) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def clear_set(path: Path) -> None:
    """Remove what a set at `path` holds (manifest, shards, index files), nothing else."""
    if not path.is_dir():
        return
    for name in os.listdir(path):
        if name == MANIFEST or _SHARD_RE.match(name) or _INDEX_RE.match(name):
            (path / name).unlink()


def index_set(
    path: Path,
    embedder,
    factory: str = "auto",
    batch_size: int = 64,
    show_progress: bool = True,
    nprobe: int = 16,
    ef_search: int = 64,
    ef_construction: int | None = None,
    k_factor: int | None = None,
) -> dict:
    """Embed every shard's references (stored in the shard, reused when the embedder is the same),
    build one FAISS index over all of them with bank-set-wide ids, and name it in the manifest."""
    import faiss

    from .atomic import atomic_file, output_lock
    from .bank_writer import update_bank
    from .embed import EmbedderSpec
    from .retrieval import (
        EMB_SECTION,
        auto_factory,
        build_index,
        compute_embeddings,
        embeddings_of,
        index_structure_problems,
    )

    path = Path(os.path.realpath(path))
    spec = embedder.spec
    with output_lock(path):
        with Bank(path) as bset:
            shards, n = bset.shard_paths, bset.n_refs
            old = bset.manifest.get("index")
        if factory.lower() == "auto":
            factory = auto_factory(n, spec.dim)
            if factory.startswith("IVF"):
                nprobe = max(nprobe, int(factory[3:].split(",")[0]) // 64)
        vectors, embedded = [], False
        for shard in shards:
            with Bank(shard) as b:
                v = embeddings_of(b) if spec.same_as(EmbedderSpec.from_header(b.header)) else None
                if v is None:
                    v = compute_embeddings(b, embedder, batch_size, show_progress)
            if not spec.same_as(EmbedderSpec.from_header(_header(shard))):
                embedded = True
                update_bank(shard, {EMB_SECTION: v.astype("<f2").tobytes()}, {**spec.header(), "m3.index.count": None})
            vectors.append(v)
        everything = np.concatenate(vectors)
        index = build_index(everything, factory, ef_construction=ef_construction, k_factor=k_factor)
        problems = index_structure_problems(index, n, spec.dim)
        if problems:
            raise M3Error(f"m3 does not read back an index built with {factory!r}: {problems[0]}")
        blob = faiss.serialize_index(index).tobytes()
        digest = hashlib.sha256(blob).hexdigest()
        name = f"index-{digest[:16]}.faiss"
        with atomic_file(path / name) as f:
            f.write(blob)
        hint = getattr(embedder, "hint", None) or spec.name
        header = {
            **spec.header(),
            "m3.embed.hint": hint,
            "m3.index.factory": factory,
            "m3.index.metric": "inner_product",
            "m3.index.count": n,
            "m3.index.nprobe": nprobe,
            "m3.index.ef_search": ef_search,
        }
        write_manifest(path, shards, {"file": name, "sha256": digest, "bytes": len(blob), "header": header})
        if old and old["file"] != name:
            (path / old["file"]).unlink(missing_ok=True)
    return {
        "references": n,
        "factory": factory,
        "embedder": spec.name,
        "dim": spec.dim,
        "embedded": embedded,
        "index_bytes": len(blob),
        "shards": len(shards),
    }


def _header(shard: Path) -> dict:
    with Bank(shard) as b:
        return dict(b.header)
