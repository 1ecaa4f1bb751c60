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
import stat
from pathlib import Path

import numpy as np

from .bank import Bank, BankError, Segment
from .errors import M3Error

MANIFEST = "manifest.json"
SET_FORMAT = "m3bankset"
SET_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 24
MAX_SHARDS = 4096
MAX_INDEX_BYTES = 1 << 40
_SHARD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.m3bank")  # used with fullmatch
_INDEX_RE = re.compile(r"index-[0-9a-f]{16}\.faiss")
# header keys that may differ between shards (counts, and each shard's own embeddings' description)
_PER_SHARD = ("m3.bank.", "m3.embed.", "m3.index.", "m3.encode.")


def shard_name(rank: int, world: int, generation: int = 1) -> str:
    """Shard r of W of the set's g-th encode (a re-encode writes new names, so the old set stays
    whole until the new manifest replaces it)."""
    return f"shard-g{generation:04d}-{rank:05d}-of-{world:05d}.m3bank"


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
        ok = isinstance(entry, dict) and isinstance(entry.get("file"), str) and _SHARD_RE.fullmatch(entry["file"])
        for key in ("references", "documents"):
            v = entry.get(key) if isinstance(entry, dict) else None
            ok = ok and isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**32
        if not ok or entry["file"] in names:
            raise BankError(f"{mpath}: a shard entry is not {{file: NAME.m3bank, references ≥ 1, documents ≥ 1}}")
        names.add(entry["file"])
    index = m.get("index")
    if index is not None:
        ok = isinstance(index, dict) and isinstance(index.get("file"), str) and _INDEX_RE.fullmatch(index["file"])
        ok = ok and isinstance(index.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", index["sha256"])
        size = index.get("bytes") if isinstance(index, dict) else None
        ok = ok and isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_INDEX_BYTES
        ok = ok and isinstance(index.get("header"), dict)
        ok = ok and all(isinstance(k, str) and k.startswith(("m3.embed.", "m3.index.")) for k in index["header"])
        if not ok:
            raise BankError(f"{mpath}: the index entry is not {{file: index-<16 hex>.faiss, sha256, bytes, header}}")
        from .bank import check_retrieval_keys

        check_retrieval_keys(index["header"])
    generation = m.get("generation", 1)
    if not isinstance(generation, int) or isinstance(generation, bool) or not 1 <= generation < 10**4:
        raise BankError(f"{mpath}: generation must be an integer in 1..9999")
    return m


class BankSet(Bank):
    """A bank set opened for reading: the shards' segments in manifest order, one header, one
    index. Writing goes through `encoding.encode_corpus` and `index_set`; `m3 add`/`remove`/
    `compact` work on single banks only."""

    is_set = True

    def __init__(self, path: Path, preamble: bytes | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._shards: list[Bank] = []
        self._index_fh = None
        self._mm = None
        _enough_descriptors(2 * len(self.manifest["shards"]) + 16)
        try:
            for entry in self.manifest["shards"]:
                shard = self.path / entry["file"]
                if not _regular(shard):  # no link, directory or device: a file of this directory
                    raise BankError(
                        f"shard {entry['file']} of {self.path} is not a regular file in the set's directory"
                    )
                self._shards.append(Bank(shard))
            if self.manifest.get("index") is not None:
                self._index_fh = self._open_index()  # held open: a later re-index cannot take it away
            self._join()
        except BaseException:
            self.close()
            raise

    @property
    def _parts(self) -> list[Bank]:
        return self._shards

    def close(self) -> None:
        for shard in getattr(self, "_shards", []):
            shard.close()
        if getattr(self, "_index_fh", None) is not None:
            self._index_fh.close()

    def _open_index(self):
        entry = self.manifest["index"]
        path = self.path / entry["file"]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise BankError(f"the index {path} named by the manifest cannot be opened: {e.strerror}") from None
        fh = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry["bytes"]:
            fh.close()
            raise BankError(f"the index {path} is not a regular file of the {entry['bytes']} bytes the manifest says")
        return fh

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
        self.version = max(s.version for s in self._parts)
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
        """The set's index file (opened with the set), after checking its size and SHA-256 against
        the manifest."""
        entry = self.manifest["index"]
        if self._index_fh is None:
            raise BankError(f"{self.path} has no index")
        self._index_fh.seek(0)
        data = self._index_fh.read(entry["bytes"] + 1)
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BankError(f"{self.path / entry['file']}: size or SHA-256 mismatch (file damaged or replaced)")
        return data

    def codebooks(self):
        return self._parts[0].codebooks()

    def drop_cache(self) -> None:
        for shard in self._parts:
            shard.drop_cache()


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _enough_descriptors(need: int) -> None:
    """A set keeps every shard open (file and mapping): raise the soft limit on open files to what
    it needs, up to the hard limit (Linux default soft limit: 1024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard)
            )
    except (ImportError, ValueError, OSError):
        pass


def bank_identity(path: Path) -> object:
    """What changes when a bank or bank set does (a cache key): a bank's size, a set's manifest
    (which names every shard and its counts, and the index by its SHA-256) and its shards' sizes."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size
    manifest = (path / MANIFEST).read_bytes()[:MAX_MANIFEST_BYTES]
    sizes = [(path / e["file"]).stat().st_size for e in read_manifest(path)["shards"]]
    return [hashlib.sha256(manifest).hexdigest(), sizes]


def generation(path: Path) -> int:
    """The number the next encode of the set at `path` gives its shards (the manifest's + 1)."""
    try:
        return read_manifest(path).get("generation", 1) + 1 if (Path(path) / MANIFEST).exists() else 1
    except M3Error:
        return 1


def write_manifest(path: Path, shards: list[Path], index: dict | None = None, generation: int = 1) -> None:
    """Write (atomically) the manifest of the set at `path` naming `shards` in order, with their
    counts read from the files; shards without references are left out (and deleted). Then remove
    the set's files it no longer names (an earlier encode's shards, an earlier index)."""
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
    manifest = {"format": SET_FORMAT, "version": SET_VERSION, "generation": generation, "shards": entries}
    if index is not None:
        manifest["index"] = index
    write_text_atomic(Path(path) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    sweep_set(path, manifest)


def sweep_set(path: Path, manifest: dict) -> None:
    """Remove the shard and index files (regular files named as m3 names them) that `manifest`
    does not name, with their key files: what a replaced or killed encode or index left."""
    named = {e["file"] for e in manifest["shards"]} | ({manifest["index"]["file"]} if manifest.get("index") else set())
    for name in os.listdir(path):
        base = name[: -len(".key.json")] if name.endswith(".key.json") else name
        ours = _SHARD_RE.fullmatch(base) and base.startswith("shard-") or _INDEX_RE.fullmatch(base)
        if ours and base not in named and _regular(Path(path) / name):
            (Path(path) / name).unlink()


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
            if not bset.is_set:
                raise M3Error(f"{path} is not a bank set")
            shards, n, gen = bset.shard_paths, bset.n_refs, bset.manifest.get("generation", 1)
        if factory.lower() == "auto":
            factory = auto_factory(n, spec.dim)
            if factory.startswith("IVF"):
                nprobe = max(nprobe, int(factory[3:].split(",")[0]) // 64)
        vectors, embedded = [], False
        for shard in shards:
            with Bank(shard) as b:
                v = embeddings_of(b) if spec.same_as(EmbedderSpec.from_header(b.header)) else None
                fresh = v is None
                if fresh:
                    v = compute_embeddings(b, embedder, batch_size, show_progress)
            if fresh:  # stored in the shard, described by its header: reused by the next index
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
        write_manifest(
            path, shards, {"file": name, "sha256": digest, "bytes": len(blob), "header": header}, generation=gen
        )
    return {
        "references": n,
        "factory": factory,
        "embedder": spec.name,
        "dim": spec.dim,
        "embedded": embedded,
        "index_bytes": len(blob),
        "shards": len(shards),
    }
