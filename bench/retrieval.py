"""Retrieval benchmarks, side by side in one run.

  index      FAISS factories on N synthetic unit vectors (384-d, the width of MiniLM, with a
             32-d intrinsic dimension): build time, recall@5 against exact search, latency per
             query (single queries, one thread, as at generation time).
  wiki-vectors  MiniLM embeddings of the installed Wikipedia summaries' sentences (.npy), so
             `index --vectors` measures on real embeddings.
  embedders  MiniLM vs the model's own hidden states (`self`) on Wikipedia summaries: texts/s,
             and recall@5 of "article title -> one of the article's references".

    python bench/retrieval.py index --n 100000 --factories "Flat;HNSW32;IVF1024,PQ48x4fs,RFlat"
    python bench/retrieval.py embedders --model out/smollm2 --corpus out/wiki500.jsonl
    python bench/retrieval.py wiki-vectors -o out/wiki-vectors.npy   # real MiniLM sentence embeddings
    python bench/retrieval.py index --vectors out/wiki-vectors.npy --factories "HNSW32;PCA64,HNSW32"
"""

import argparse
import json
import time

import numpy as np


def synthetic(n: int, dim: int, seed: int, latent: int = 32) -> np.ndarray:
    """Unit vectors with low intrinsic dimension, like sentence embeddings: a 32-d Gaussian
    latent through a fixed random projection to `dim`, plus 5% isotropic noise."""
    proj = np.random.default_rng(12345).standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = rng.standard_normal((m, latent)).astype(np.float32) @ proj
        x += 0.05 * rng.standard_normal((m, dim)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_index(args) -> None:
    import faiss

    from m3cli.retrieval import build_index, empty_index, hnsw_of

    if args.vectors:  # real embeddings (`wiki-vectors`): the last --queries rows are the queries
        data = np.load(args.vectors, allow_pickle=False).astype(np.float32)
        if len(data) <= args.queries:
            raise SystemExit(f"{args.vectors} holds {len(data)} vectors, not more than --queries")
        base, queries = data[:-args.queries][:args.n], data[-args.queries:]
        args.n, args.dim = len(base), base.shape[1]
    else:
        base = synthetic(args.n, args.dim, 0)
        queries = synthetic(args.queries, args.dim, 1)
    faiss.omp_set_num_threads(args.threads)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(base)
    _, truth = exact.search(queries, 5)
    rows = []
    for factory in args.factories.split(";"):
        efc = args.ef_construction if hnsw_of(empty_index(args.dim, factory)) is not None else None
        t = time.perf_counter()
        kf = args.k_factor if factory.endswith(",RFlat") else None
        index = build_index(base, factory, ef_construction=efc, k_factor=kf)
        build = time.perf_counter() - t
        index_mb = round(faiss.serialize_index(index).size / 2**20, 1)
        params = [("", None)]
        if "IVF" in factory:
            params = [("nprobe", v) for v in args.nprobe.split(",")]
        elif "HNSW" in factory:
            params = [("efSearch", v) for v in args.ef_search.split(",")]
        for name, value in params:
            if name:
                faiss.ParameterSpace().set_index_parameter(index, name, int(value))
            faiss.omp_set_num_threads(1)
            t = time.perf_counter()
            found = np.stack([index.search(q[None], 5)[1][0] for q in queries])
            latency_ms = (time.perf_counter() - t) / len(queries) * 1000
            faiss.omp_set_num_threads(args.threads)
            recall = float(np.mean([len(set(f) & set(g)) / 5 for f, g in zip(found, truth)]))
            notes = ", ".join(x for x in (f"efConstruction {efc}" if efc else "", f"k_factor {kf}" if kf else "") if x)
            rows.append({"factory": factory + (f" ({notes})" if notes else ""),
                         "param": f"{name}={value}" if name else "", "n": args.n,
                         "build_s": round(build, 1), "recall_at_5": round(recall, 4),
                         "ms_per_query": round(latency_ms, 3),
                         "index_mb": index_mb})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| factory | search parameter | vectors | build s | recall@5 | ms/query | index MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['factory']} | {r['param']} | {r['n']:,} | {r['build_s']} | {r['recall_at_5']} | {r['ms_per_query']} | {r['index_mb']} |")


def wiki_vectors(args) -> None:
    """MiniLM embeddings of the sentences of the installed Wikipedia summaries, as a .npy file:
    real sentence embeddings for `index --vectors` (the summaries are read at run time)."""
    import re
    import sys
    from pathlib import Path

    from m3cli.embed import load_embedder

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from wiki_corpus import summaries  # the package's summaries, read at run time

    data = summaries()
    sentences = [s for key in sorted(data) for s in re.split(r"(?<=[.!?])\s+", (data[key].get("extract") or "").strip())
                 if len(s.split()) >= 4][: args.limit]
    rng = np.random.default_rng(0)
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]  # queries: a random sample
    emb = load_embedder("minilm")
    t = time.perf_counter()
    vectors = np.concatenate([emb.embed(sentences[i:i + 256]) for i in range(0, len(sentences), 256)])
    print(json.dumps({"sentences": len(sentences), "dim": int(vectors.shape[1]),
                      "texts_per_s": round(len(sentences) / (time.perf_counter() - t), 1)}), flush=True)
    np.save(args.output, vectors.astype(np.float32), allow_pickle=False)


def bench_embedders(args) -> None:
    from m3cli.corpus import read_corpus, split_references
    from m3cli.checkpoint import load_tokenizer
    from m3cli.embed import load_embedder
    from m3cli.retrieval import build_index

    tok = load_tokenizer(args.model)
    refs, owner, titles = [], [], []
    for j, doc in enumerate(read_corpus(str(args.corpus))):
        titles.append(doc.title)
        for text, _ in split_references(doc.text, tok, 128):
            refs.append(text)
            owner.append(j)
    owner = np.array(owner)
    rows = []
    for name in ("minilm", "self"):
        emb = load_embedder(name, model_dir=args.model)
        t = time.perf_counter()
        vectors = np.concatenate([emb.embed(refs[i:i + 32]) for i in range(0, len(refs), 32)])
        per_s = len(refs) / (time.perf_counter() - t)
        index = build_index(vectors, "Flat")
        _, ids = index.search(emb.embed(titles), 5)
        recall = float(np.mean([j in set(owner[row]) for j, row in enumerate(ids)]))
        rows.append({"embedder": name, "dim": emb.spec.dim, "references": len(refs), "texts_per_s": round(per_s, 1),
                     "title_recall_at_5": round(recall, 4)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| embedder | dim | references/s | title → article recall@5 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['embedder']} | {r['dim']} | {r['texts_per_s']} | {r['title_recall_at_5']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("index")
    a.add_argument("--n", type=int, default=100_000)
    a.add_argument("--dim", type=int, default=384)
    a.add_argument("--queries", type=int, default=500)
    a.add_argument("--factories", default="Flat;HNSW32;IVF1024,SQ8;IVF1024,PQ48x4fs,RFlat", help="separated by ;")
    a.add_argument("--nprobe", default="16", help="comma-separated values to sweep")
    a.add_argument("--ef-search", default="64", help="comma-separated values to sweep")
    a.add_argument("--vectors", help="a .npy of real embeddings (e.g. from wiki-vectors) instead of synthetic ones")
    a.add_argument("--ef-construction", type=int, default=None, help="HNSW build depth (default: FAISS's 40)")
    a.add_argument("--k-factor", type=int, default=None, help="for ,RFlat factories: candidates re-ranked per result")
    a.add_argument("--threads", type=int, default=2, help="threads for building; queries use one")
    b = sub.add_parser("embedders")
    b.add_argument("--model", required=True)
    b.add_argument("--corpus", required=True)
    w = sub.add_parser("wiki-vectors")
    w.add_argument("-o", "--output", required=True)
    w.add_argument("--limit", type=int, default=50_000, help="at most this many sentences")
    args = ap.parse_args()
    {"index": bench_index, "embedders": bench_embedders, "wiki-vectors": wiki_vectors}[args.what](args)


if __name__ == "__main__":
    main()
