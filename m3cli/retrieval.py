"""Retrieval over a bank: reference embeddings, the FAISS index stored inside the bank, search.

`index_bank` computes the embeddings a bank lacks (batched, resumable), builds a FAISS index
from a factory string and adds both to the bank without rewriting its KV payload
(`bank.update_bank`). FAISS rows are mapped to reference indices explicitly (IndexIDMap2).
`Retriever` answers queries, optionally dropping references that overlap a query too much
(Eq. 6, `overlap.py`). Knows nothing about the LM's forward pass.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import open_existing, open_new, output_lock, write_text_atomic
from .bank import MAX_INDEX_PARAM, Bank, BankError, segment_name
from .bank_writer import update_bank
from .embed import EmbedderSpec
from .errors import M3Error
from .overlap import overlap, words
from .index_check import ALLOWED_INDEXES, index_chain, index_structure_problems  # noqa: F401

EMB_SECTION = "emb.data"  # float16 (N, dim), row i = reference i
INDEX_SECTION = "index.faiss"  # faiss.serialize_index of an IndexIDMap2, ids = reference indices
TRAIN_SAMPLE = 262_144  # most vectors used to train IVF/PQ indexes
CHECKPOINT_SECONDS = 2.0


def embeddings_of(bank: Bank, segment=None) -> np.ndarray | None:
    """The bank's stored embeddings as float32 (N, dim) — or one segment's (its n, dim) — or None
    when they are not all there."""
    spec = EmbedderSpec.from_header(bank.header)
    segments = bank.segments if segment is None else [segment]
    if spec is None or any(seg.prefix + EMB_SECTION not in bank._parts[seg.part].sections for seg in segments):
        return None
    if bank.is_set and not all(spec.same_as(EmbedderSpec.from_header(f.header)) for f in bank._parts):
        return None  # a shard embedded by another embedder than the set's index (a killed re-index)
    parts = []
    for seg in segments:
        f, name = bank._parts[seg.part], seg.prefix + EMB_SECTION
        s = f.sections[name]
        if s.length != seg.n_refs * spec.dim * 2:
            raise BankError(f"section {name} has {s.length} bytes, expected {seg.n_refs * spec.dim * 2}")
        parts.append(np.frombuffer(f.raw(name), dtype="<f2").reshape(seg.n_refs, spec.dim).astype(np.float32))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def compute_embeddings(bank: Bank, embedder, batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
    """Embed every reference's text; resumable through `.<bank>.emb.partial` beside the bank."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    spec = embedder.spec
    spool = bank.path.parent / f".{bank.path.name}.emb.partial"
    state_path = Path(str(spool) + ".json")
    key = {
        "spec": spec.__dict__,
        "bank": bank.header.get("m3.model.fingerprint"),
        "n": bank.n_refs,
        "texts": [  # the references themselves: an add, remove or compact may keep N and change them
            bank.sections[seg.prefix + name].sha256.hex()
            for seg in bank.segments
            for name in ("refs.table", "refs.text")
        ],
    }
    done = 0
    if (
        os.path.lexists(spool)
        and os.path.lexists(state_path)
        and not spool.is_symlink()
        and not state_path.is_symlink()
    ):
        try:
            state = json.loads(state_path.read_text())
            if state["key"] == key and spool.stat().st_size >= state["done"] * spec.dim * 2:
                done = int(state["done"])
        except (ValueError, KeyError, TypeError, OSError):
            done = 0
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("refs"),
        TimeRemainingColumn(),
        console=console,
        disable=not show_progress or not console.is_terminal,
    )
    last = time.monotonic()
    try:
        f = open_existing(spool) if done else open_new(spool, "w+b")  # never through a planted link
    except OSError as e:
        raise M3Error(f"cannot write {spool}: {e.strerror}") from None
    with f, progress:
        f.truncate(done * spec.dim * 2)
        f.seek(0, os.SEEK_END)
        task = progress.add_task("embed", total=bank.n_refs, completed=done)
        for start in range(done, bank.n_refs, batch_size):
            texts = [bank.reference(i).text for i in range(start, min(start + batch_size, bank.n_refs))]
            f.write(embedder.embed(texts).astype("<f2").tobytes())
            progress.update(task, advance=len(texts))
            if time.monotonic() - last >= CHECKPOINT_SECONDS:
                f.flush()
                os.fsync(f.fileno())
                write_text_atomic(state_path, json.dumps({"key": key, "done": start + len(texts)}))
                last = time.monotonic()
        f.flush()
        f.seek(0)
        data = np.frombuffer(f.read(), dtype="<f2").reshape(bank.n_refs, spec.dim).astype(np.float32)
    spool.unlink()
    state_path.unlink(missing_ok=True)
    return data


def _find(index, has: str):
    """The first index with attribute `has` inside an index built from a factory string
    (through ID maps, transforms such as PCA, and refinement wrappers), or None."""
    import faiss

    for _ in range(8):
        if index is None:
            return None
        index = faiss.downcast_index(index)
        if hasattr(index, has):
            return index
        index = getattr(index, "index", None) or getattr(index, "base_index", None)
    return None


def hnsw_of(index):
    """The HNSW index inside a factory-built index, or None."""
    return _find(index, "hnsw")


def refine_of(index):
    """The refinement wrapper (`…,RFlat`) of a factory-built index, or None."""
    return _find(index, "k_factor")


def empty_index(dim: int, factory: str, ef_construction: int | None = None, k_factor: int | None = None):
    """The untrained FAISS index of a factory string (inner product); a clear error for an
    invalid string, for ef_construction on an index without HNSW, or for k_factor (candidates
    per result re-ranked with the exact vectors; kept in the serialized index) without `RFlat`."""
    import faiss

    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise M3Error(f"invalid FAISS index factory {factory!r} (e.g. Flat, HNSW32, IVF1024,PQ32)") from None
    chain = index_chain(base)
    kinds = sorted({type(x).__name__ for x in chain} - ALLOWED_INDEXES)
    if not kinds and any(x.metric_type != faiss.METRIC_INNER_PRODUCT for x in chain):
        kinds = [f"{type(base).__name__} with another metric than inner product"]
    for x in chain if not kinds else []:
        if type(x).__name__ == "IndexIDMap2":
            kinds = ["a nested ID map"]
        elif hasattr(x, "invlists") and type(faiss.downcast_index(x.quantizer)).__name__ not in (
            "IndexFlat",
            "IndexFlatIP",
        ):
            kinds = [f"an IVF index with a {type(faiss.downcast_index(x.quantizer)).__name__} quantizer"]
        elif type(x).__name__ == "IndexPreTransform" and any(
            type(faiss.downcast_VectorTransform(x.chain.at(i))).__name__ != "PCAMatrix" for i in range(x.chain.size())
        ):
            kinds = ["a vector transform other than PCA"]
    if kinds:
        raise M3Error(
            f"FAISS index factory {factory!r} builds {kinds[0]}, which m3 does not read; use Flat, "
            "HNSW (Flat, PQ or SQ storage), IVF (Flat, PQ or SQ), PQ, SQ, a PCA transform, or ,RFlat"
        )
    if ef_construction is not None:
        hnsw = hnsw_of(base)
        if hnsw is None:
            raise M3Error(f"--ef-construction applies to HNSW indexes; {factory!r} has none")
        if ef_construction < 1:
            raise M3Error("--ef-construction must be at least 1")
        hnsw.hnsw.efConstruction = ef_construction
    if k_factor is not None:
        refine = refine_of(base)
        if refine is None:
            raise M3Error(f"--k-factor applies to refined indexes (a factory ending in ,RFlat); {factory!r} is not")
        if k_factor < 1:
            raise M3Error("--k-factor must be at least 1")
        refine.k_factor = float(k_factor)
    return base


def build_index(
    vectors: np.ndarray,
    factory: str,
    ids: np.ndarray | None = None,
    ef_construction: int | None = None,
    k_factor: int | None = None,
):
    """An inner-product FAISS index from a factory string, trained on a sample, ids attached.
    ef_construction: HNSW graph-building depth (FAISS's default 40 when None); higher builds a
    better graph (more recall at the same search depth) more slowly. k_factor: see `empty_index`."""
    import faiss

    n, dim = vectors.shape
    base = empty_index(dim, factory, ef_construction, k_factor)
    if not base.is_trained:
        ivf = _find(base, "nlist")
        want = max(TRAIN_SAMPLE, 40 * int(faiss.downcast_index(ivf).nlist)) if ivf is not None else TRAIN_SAMPLE
        step = max(1, n // want)  # FAISS's k-means wants about 40 points per list
        sample = np.ascontiguousarray(vectors[::step][:want])
        try:
            base.train(sample)
        except RuntimeError as e:
            msg = (str(e).splitlines() or ["training failed"])[-1].split("failed: ")[-1]
            raise M3Error(f"cannot train index {factory!r} on {len(sample)} vectors: {msg}") from None
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(
        np.ascontiguousarray(vectors, dtype=np.float32),
        np.arange(n, dtype=np.int64) if ids is None else ids.astype(np.int64),
    )
    return index


def auto_factory(n: int, dim: int) -> str:
    """The index `--factory auto` builds for n references of width dim: exact search while it is
    cheap (Flat up to 100,000), then a graph (HNSW32 up to 2 million), then IVF-PQ with about
    4·sqrt(n) lists (a power of two; `index_bank` then probes at least 1/64 of them) and
    8-dimensional sub-vectors of 8 bits."""
    if n <= 100_000:
        return "Flat"
    if n <= 2_000_000:
        return "HNSW32"
    nlist = 1 << round(math.log2(4 * math.sqrt(n)))
    m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0)
    return f"IVF{nlist},PQ{m}"


def index_bank(
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
    """Add embeddings (if missing or from another embedder) and a FAISS index to the bank; the
    bank is locked against other writers meanwhile. factory "auto": `auto_factory`. A bank with
    appended segments or removed documents is compacted first (one index covers all of it)."""
    path = Path(os.path.realpath(path))  # the bank's own lock, whichever way it is named
    if factory.lower() != "auto":
        empty_index(embedder.spec.dim, factory, ef_construction, k_factor)  # bad settings fail before any change
    for name, value in (("--nprobe", nprobe), ("--ef-search", ef_search)):
        if not 1 <= value <= MAX_INDEX_PARAM:
            raise M3Error(f"{name} must be in 1..{MAX_INDEX_PARAM}")
    if path.is_dir():  # a bank set: one index over its shards
        from .bankset import index_set

        return index_set(
            path, embedder, factory, batch_size, show_progress, nprobe, ef_search, ef_construction, k_factor
        )
    with output_lock(path):
        with Bank(path) as bank:
            fold = len(bank.segments) > 1 or bank.removed.size > 0
        if fold:  # one index over all of it; the bank stays searchable if what follows fails
            from .bank_update import compact_bank

            compact_bank(path)
        return _index_bank(
            path, embedder, factory, batch_size, show_progress, nprobe, ef_search, ef_construction, k_factor
        )


def _index_bank(path, embedder, factory, batch_size, show_progress, nprobe, ef_search, ef_construction, k_factor):
    if factory.lower() == "auto":
        with Bank(path) as bank:
            factory = auto_factory(bank.n_refs, embedder.spec.dim)
        if factory.startswith("IVF"):  # search about 1/64 of the lists, not a fixed 16 of thousands
            nprobe = max(nprobe, int(factory[3:].split(",")[0]) // 64)
    empty_index(embedder.spec.dim, factory, ef_construction, k_factor)  # bad settings fail before any embedding
    for name, value in (("--nprobe", nprobe), ("--ef-search", ef_search)):
        if not 1 <= value <= MAX_INDEX_PARAM:
            raise M3Error(f"{name} must be in 1..{MAX_INDEX_PARAM}")
    import faiss

    with output_lock(path):
        with Bank(path) as bank:
            if bank.n_refs == 0:
                raise M3Error(f"{path} holds no references to index")
            vectors = embeddings_of(bank) if embedder.spec.same_as(EmbedderSpec.from_header(bank.header)) else None
            fresh = vectors is None
            if fresh:
                vectors = compute_embeddings(bank, embedder, batch_size, show_progress)
            index = build_index(vectors, factory, ef_construction=ef_construction, k_factor=k_factor)
            problems = index_structure_problems(index, bank.n_refs, embedder.spec.dim)
            if problems:
                raise M3Error(f"m3 does not read back an index built with {factory!r}: {problems[0]}")
        blob = faiss.serialize_index(index).tobytes()
        add = {INDEX_SECTION: blob}
        if fresh:
            add[EMB_SECTION] = vectors.astype("<f2").tobytes()
        hint = getattr(embedder, "hint", None) or embedder.spec.name
        update_bank(
            path,
            add,
            {
                **embedder.spec.header(),
                "m3.embed.hint": hint,
                "m3.index.factory": factory,
                "m3.index.metric": "inner_product",
                "m3.index.count": int(index.ntotal),
                "m3.index.nprobe": nprobe,
                "m3.index.ef_search": ef_search,
            },
        )
        return {
            "references": int(index.ntotal),
            "factory": factory,
            "embedder": embedder.spec.name,
            "dim": embedder.spec.dim,
            "embedded": fresh,
            "index_bytes": len(blob),
        }


@dataclass(frozen=True)
class Hit:
    ref: int
    score: float
    doc_id: str
    title: str
    text: str


def check_max_gap(max_gap: float | None) -> None:
    """`--max-score-gap`: None (keep the top-k) or a finite number >= 0."""
    if max_gap is not None and not (max_gap >= 0 and math.isfinite(max_gap)):
        raise M3Error("--max-score-gap must be a number >= 0")


class Retriever:
    """Top-k references of a bank for text queries, with the bank's own embedder."""

    def __init__(self, bank: Bank, embedder) -> None:
        spec = EmbedderSpec.from_header(bank.header)
        if not bank.has_index or spec is None:
            raise M3Error(f"{bank.path} has no retrieval index; build one with `m3 index {bank.path}`")
        if bank.n_refs == 0:
            raise M3Error(f"{bank.path} holds no references to retrieve")
        if not spec.same_as(embedder.spec):
            raise M3Error(
                f"{bank.path} was indexed with embedder {spec.name} ({spec.fingerprint[:19]}…, "
                f"dim {spec.dim}) but the query embedder is {embedder.spec.name} "
                f"({embedder.spec.fingerprint[:19]}…, dim {embedder.spec.dim})"
            )
        self.bank, self.embedder = bank, embedder
        if bank.is_set:  # one index over every shard, ids across the set
            self.indexes = [(0, load_index(bank))]
        else:
            self.indexes = [(seg.first_ref, load_index(bank, seg)) for seg in bank.segments]
        self.index = self.indexes[0][1]  # the base's (all of it for a bank without appended segments)
        self.removed_refs = bank.removed_refs

    def _search(self, vectors: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Top `fetch` (score, reference) per query over the base and every appended segment."""
        if len(self.indexes) == 1:
            return self.index.search(vectors, fetch)
        scores, ids = [], []
        for first, index in self.indexes:
            if index.ntotal == 0:
                continue
            s, i = index.search(vectors, min(fetch, index.ntotal))
            scores.append(s)
            ids.append(np.where(i >= 0, i + first, -1))
        all_scores, all_ids = np.concatenate(scores, 1), np.concatenate(ids, 1)
        all_scores = np.where(all_ids >= 0, all_scores, -np.inf)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :fetch]
        return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1)

    def search(
        self,
        queries: list[str],
        k: int = 5,
        max_overlap: float | None = None,
        max_gap: float | None = None,
        vectors: np.ndarray | None = None,
    ) -> list[list[Hit]]:
        """Up to k hits per query, best first. max_overlap: skip references whose text overlaps
        the query's by more than this (Eq. 6). max_gap: also drop hits scoring more than this
        below the query's best hit (the retriever's confidence: a clear winner comes alone).
        vectors: the queries' embeddings when the caller has them already."""
        if vectors is None:
            vectors = self.embedder.embed(queries)
        if max_overlap is not None and max_overlap >= 1.0:
            max_overlap = None  # no reference overlaps a text by more than all of it
        total = sum(index.ntotal for _, index in self.indexes)
        # removed documents' references are skipped: fetching that many more still finds k others
        fetch = min(total, (k if max_overlap is None else 4 * k) + self.removed_refs)
        scores, ids = self._search(vectors, fetch)
        results = []
        for q, vec, row_scores, row_ids in zip(queries, vectors, scores, ids):
            hits, qwords = [], words(q)
            if not vec.any():  # a static embedder's query with no known token: nothing matches it
                results.append(hits)
                continue
            for score, i in zip(row_scores, row_ids):
                if i < 0:
                    continue
                ref = self.bank.reference(int(i))
                if self.removed_refs and self.bank.is_removed(ref.doc_index):
                    continue
                if max_overlap is not None and overlap(words(ref.text), qwords) > max_overlap:
                    continue
                doc = self.bank.document(ref.doc_index)
                hits.append(Hit(int(i), float(score), doc.id, doc.title, ref.text))
                if len(hits) == k:
                    break
            if max_gap is not None and hits:
                hits = [h for h in hits if h.score >= hits[0].score - max_gap]
            results.append(hits)
        return results


@contextlib.contextmanager
def bounded_address_space(extra: int):
    """Let the block grow the process's address space by at most `extra` bytes (Linux).

    FAISS's reader sizes each vector from a length field in the data and allocates (and zero-
    fills) it before reading; a length behind a recomputed checksum could ask for terabytes. With
    the soft RLIMIT_AS lowered for the deserialisation, such an allocation fails at once (FAISS
    raises) instead of exhausting memory. The limit is restored afterwards."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError, AttributeError):
        yield  # not Linux: no bound
        return
    limit = current + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield  # already bounded at least as tightly
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def load_index(bank: Bank, segment=None):
    """Deserialize the bank's FAISS index (or an appended segment's) — only after its SHA-256
    matches the section table and it starts with the IndexIDMap2 tag, with its allocations
    bounded — then check its structure against the bank (allowed types, counts, dimensions, ids,
    graph links, list entries) before any search runs. What is nested inside the ID map is
    parsed by FAISS's own reader first. A segment's index numbers its references from 0."""
    import faiss

    seg = segment or bank.segments[0]
    if bank.is_set:
        from .bankset import Segment as _Segment

        seg = _Segment(0, 0, bank.n_refs, 0, bank.n_docs)
        name = bank.manifest["index"]["file"]
        raw = bank.index_bytes()
    else:
        name = seg.prefix + INDEX_SECTION
        if name not in bank.sections:
            raise BankError(f"the bank has an index but no section {name}; rebuild it with `m3 index`")
        raw = bank.verified(name)
    if raw[:4] != b"IxM2":
        raise BankError(f"section {name} is not an m3 index (an IndexIDMap2); rebuild it with `m3 index`")
    try:
        with bounded_address_space(4 * len(raw) + (512 << 20)):
            index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8).copy())
    except (RuntimeError, MemoryError, ValueError):
        raise BankError(f"section {name} is not a readable FAISS index; rebuild it with `m3 index`") from None
    dim = bank.header.get("m3.embed.dim")
    if index.ntotal != seg.n_refs or index.d != dim:
        raise BankError(
            f"the index {name} holds {index.ntotal} vectors of dim {index.d}, "
            f"the bank {seg.n_refs} references of dim {dim}"
        )
    problems = index_structure_problems(index, seg.n_refs, dim)
    if problems:
        raise BankError(f"section {name}: {problems[0]}; rebuild it with `m3 index`")
    ivf = _find(index, "nprobe")
    nprobe = bank.header.get("m3.index.nprobe")
    if ivf is not None and isinstance(nprobe, int) and nprobe > 0:
        nlist = int(faiss.downcast_index(ivf).nlist)
        if seg.number:  # a segment's own index (`auto` for its size): probe at least 1/64 of its lists
            nprobe = max(nprobe, nlist // 64)
        faiss.downcast_index(ivf).nprobe = min(nprobe, nlist)
    hnsw = hnsw_of(index)
    ef = bank.header.get("m3.index.ef_search")
    if hnsw is not None and isinstance(ef, int) and ef > 0:
        hnsw.hnsw.efSearch = ef  # bounded by MAX_INDEX_PARAM when the bank was opened
    return index


def index_problems(bank: Bank, segments: list[int] | None = None) -> list[str]:
    """`m3 inspect --verify`'s retrieval part: the embeddings and the index load and fit the bank,
    so that a bank that passes never fails a search for a reason inside the file. segments: check
    only these (what `m3 add` appends)."""
    has_index = bank.has_index
    has_emb = any(EMB_SECTION in f.sections for f in bank._parts) if bank.is_set else EMB_SECTION in bank.sections
    if not has_index and not has_emb:
        if any(segment_name(name)[1] in (INDEX_SECTION, EMB_SECTION) for name in bank.sections):
            return ["an appended segment has an index or embeddings, the base has none"]
        return []
    try:
        spec = EmbedderSpec.from_header(bank.header)
        if spec is None:
            return ["the bank holds an index or embeddings but no embedder description (m3.embed.*)"]
        for seg in bank.segments:
            if segments is not None and seg.number not in segments:
                continue
            if has_emb:
                vectors = embeddings_of(bank, seg)
                if vectors is None:
                    return [f"the bank has embeddings but no section {seg.prefix}{EMB_SECTION}"]
                if not np.isfinite(vectors).all():
                    return [f"section {seg.prefix}{EMB_SECTION} holds values that are not finite numbers"]
            if has_index and not bank.is_set:
                load_index(bank, seg)
        if has_index and bank.is_set:
            load_index(bank)
        if has_index and bank.header.get("m3.index.count", bank.n_refs) != bank.n_refs:
            return [
                f"header says the index holds {bank.header['m3.index.count']} vectors, the bank has "
                f"{bank.n_refs} references"
            ]
    except M3Error as e:
        return [str(e)]
    return []


def query_embedder(bank: Bank, model_dir=None, encoder: str | None = None, device="cpu", model=None, tokenizer=None):
    """The embedder a bank's index was built with, for queries: MiniLM, the model itself (`self`,
    reusing `model` when it is already loaded), or the encoder dir given as `encoder`."""
    from .embed import SelfEmbedder, load_embedder

    spec = EmbedderSpec.from_header(bank.header)
    if spec is None or not bank.has_index:
        raise M3Error(f"{bank.path} has no retrieval index; build one with `m3 index {bank.path}`")
    if spec.name == "minilm":
        return load_embedder("minilm", device=device)
    if spec.name == "self":
        if model is not None and model_dir is not None:
            from .checkpoint import model_fingerprint

            return SelfEmbedder(model, tokenizer, model_fingerprint(model_dir))
        return load_embedder("self", model_dir=model_dir, device=device)
    if encoder is None:
        hint = bank.header.get("m3.embed.hint")
        if isinstance(hint, str) and Path(hint).is_dir():
            encoder = hint  # the directory it was indexed with; the Retriever checks its fingerprint
        else:
            where = f" (at {hint}, which is not here)" if isinstance(hint, str) and hint else ""
            raise M3Error(
                f"{bank.path} was indexed with the embedder {spec.name}{where}: pass its directory with --embedder"
            )
    return load_embedder(encoder, pooling=spec.pooling, device=device)
