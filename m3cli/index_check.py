"""Checks of a FAISS index read from a bank, before it is used: only the index types m3 builds,
and their structure (ids, counts, dimensions, metric, graph links, inverted lists) consistent
with the bank. FAISS trusts what it deserializes; m3 does not (format_spec.md, "Reading").
"""

from __future__ import annotations

import numpy as np


# The index types m3 builds and reads back; anything else in a bank is refused before use.
ALLOWED_INDEXES = {
    "IndexIDMap2",
    "IndexFlatIP",
    "IndexFlat",
    "IndexHNSWFlat",
    "IndexHNSWSQ",
    "IndexIVFFlat",
    "IndexIVFPQ",
    "IndexIVFScalarQuantizer",
    "IndexPQ",
    "IndexScalarQuantizer",
    "IndexRefineFlat",
    "IndexPreTransform",
}


def index_chain(index) -> list:
    """Every index object inside `index` (ID map, refinement, transform, HNSW storage, IVF quantizer)."""
    import faiss

    out, todo = [], [index]
    while todo and len(out) < 16:
        x = todo.pop()
        if x is None:
            continue
        x = faiss.downcast_index(x)
        out.append(x)
        for attr in ("index", "base_index", "refine_index", "storage", "quantizer"):
            child = getattr(x, attr, None)
            if child is not None:
                todo.append(child)
    return out


def _arr(vec) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(vec)


def index_structure_problems(index, n: int, dim: int) -> list[str]:
    """What in a FAISS index would make a search read out of bounds or answer with ids that are
    not references of the bank: checked for every index type on the allow-list."""
    import faiss

    problems: list[str] = []
    outer = faiss.downcast_index(index)
    if type(outer).__name__ != "IndexIDMap2":
        return [f"the index is a {type(outer).__name__}, not an IndexIDMap2"]
    ids = _arr(outer.id_map)
    if ids.size != n or (n and (ids.min() < 0 or ids.max() >= n or np.unique(ids).size != n)):
        return ["its ids are not the bank's reference numbers, each once"]
    ivf = next((y for y in index_chain(outer) if hasattr(y, "invlists")), None)  # its quantizer holds nlist vectors
    for position, x in enumerate(index_chain(outer)):
        kind = type(x).__name__
        if kind not in ALLOWED_INDEXES:
            return [f"index type {kind} is not one m3 reads"]
        if x.metric_type != faiss.METRIC_INNER_PRODUCT:
            return [f"{kind} does not use the inner-product metric"]
        if not x.is_trained:
            return [f"{kind} is not trained"]
        if not 1 <= x.d <= 65536:
            return [f"{kind} has dimension {x.d}"]
        expect_n = int(ivf.nlist) if ivf is not None and int(ivf.quantizer.this) == int(x.this) else n
        if x.ntotal != expect_n:
            return [f"{kind} holds {x.ntotal} vectors, expected {expect_n}"]
        if hasattr(x, "codes") and hasattr(x, "code_size") and not hasattr(x, "invlists"):
            if x.code_size < 1 or x.codes.size() != x.ntotal * x.code_size:
                return [f"{kind} stores {x.codes.size()} code bytes for {x.ntotal} vectors of {x.code_size}"]
        if kind in ("IndexFlatIP", "IndexFlat"):
            if x.code_size != 4 * x.d:
                return [f"{kind} has code size {x.code_size} for dimension {x.d}"]
            if not np.isfinite(_arr(x.codes).view(np.float32)).all():
                return [f"{kind} holds vectors that are not finite numbers"]
        if hasattr(x, "pq") and (
            x.pq.M < 1
            or x.pq.nbits < 1
            or x.pq.nbits > 16
            or x.pq.M * x.pq.dsub != x.d
            or _arr(x.pq.centroids).size != x.d * (1 << x.pq.nbits)
        ):
            return [f"{kind} has an inconsistent product quantizer"]
        if hasattr(x, "hnsw"):
            problems = _hnsw_problems(x.hnsw, int(x.ntotal))
        elif hasattr(x, "invlists"):
            problems = _ivf_problems(x, n)
        elif kind == "IndexPreTransform":
            d = x.d
            for i in range(x.chain.size()):
                vt = faiss.downcast_VectorTransform(x.chain.at(i))
                if (
                    type(vt).__name__ != "PCAMatrix"
                    or vt.d_in != d
                    or not 1 <= vt.d_out <= d
                    or _arr(vt.A).size != vt.d_in * vt.d_out
                    or _arr(vt.b).size != vt.d_out
                    or not np.isfinite(_arr(vt.A)).all()
                ):
                    return ["its vector transform is not a consistent PCA matrix"]
                d = vt.d_out
            if faiss.downcast_index(x.index).d != d:
                return ["its transform's output dimension differs from the index it feeds"]
        elif kind in ("IndexRefineFlat", "IndexRefine") and (x.base_index.d != x.d or x.refine_index.d != x.d):
            return ["its refinement dimensions differ"]
        elif kind == "IndexIDMap2" and position:
            return ["it nests ID maps"]
        if problems:
            return problems
    return []


def _hnsw_problems(hnsw, n: int) -> list[str]:
    levels, offsets = _arr(hnsw.levels), _arr(hnsw.offsets)
    cum, neighbors = _arr(hnsw.cum_nneighbor_per_level), _arr(hnsw.neighbors)
    if levels.size != n or offsets.size != n + 1 or cum.size < 2:
        return ["its HNSW graph does not have one node per vector"]
    if n and (
        levels.min() < 1
        or levels.max() >= cum.size
        or offsets[0] != 0
        or offsets[-1] != neighbors.size
        or not (np.diff(offsets) == cum[levels]).all()
    ):
        return ["its HNSW graph's levels and offsets disagree"]
    if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= n):
        return ["its HNSW graph links to nodes that do not exist"]
    if n and (
        not 0 <= hnsw.entry_point < n
        or hnsw.max_level != levels.max() - 1
        or levels[hnsw.entry_point] - 1 != hnsw.max_level
    ):
        return ["its HNSW entry point is not a node of the top level"]
    return []


def _ivf_problems(index, n: int) -> list[str]:
    import faiss

    inv = index.invlists
    if inv.nlist != index.nlist or not 1 <= index.nlist <= 1 << 24 or inv.code_size != index.code_size:
        return ["its inverted lists do not match the index"]
    total = 0
    for i in range(inv.nlist):
        size = inv.list_size(i)
        total += size
        if total > n:
            break
        if size:
            ids = faiss.rev_swig_ptr(inv.get_ids(i), size)
            if ids.min() < 0 or ids.max() >= n:
                return [f"inverted list {i} holds ids outside the bank"]
    if total != n:
        return [f"its inverted lists hold {total} entries for {n} vectors"]
    return []
