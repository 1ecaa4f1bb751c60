"""Retrieval benchmarks, side by side in one run.

index      FAISS factories on N synthetic unit vectors (384-d, the width of MiniLM, with a
           32-d intrinsic dimension): build time, recall@5 against exact search, latency per
           query (single queries, one thread, as at generation time).
wiki-vectors  MiniLM embeddings of the installed Wikipedia summaries' sentences (.npy), so
           `index --vectors` measures on real embeddings.
embedders  MiniLM vs the model's own hidden states (`self`) vs a static embedder dir
           (`--embedders`) on Wikipedia summaries: texts/s, the time of 16 chunk-sized queries
           (generation's batch), and recall@5 of "article title -> one of its references".
qa         on an indexed bank and m3 synth's questions: how often the person a question names
           is the retriever's first hit, and among its 5, and by what cosine margin it leads
           the second hit when it is first.

  python bench/retrieval.py index --n 100000 --factories "Flat;HNSW32;IVF1024,PQ48x4fs,RFlat"
  python bench/retrieval.py embedders --model out/smollm2 --corpus out/wiki500.jsonl
  python bench/retrieval.py embedders --model out/smollm2 --corpus out/wiki500.jsonl --embedders minilm,out/minilm-static
  python bench/retrieval.py qa --bank out/proof/kb.m3bank --qa out/proof/qa_unseen.jsonl
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
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_index(args) -> None:
    import faiss

    from m3cli.retrieval import build_index, empty_index, hnsw_of

    if args.vectors:  # real embeddings (`wiki-vectors`): the last --queries rows are the queries
        data = np.load(args.vectors, allow_pickle=False).astype(np.float32)
        if len(data) <= args.queries:
            raise SystemExit(f"{args.vectors} holds {len(data)} vectors, not more than --queries")
        base, queries = data[: -args.queries][: args.n], data[-args.queries :]
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
            rows.append(
                {
                    "factory": factory + (f" ({notes})" if notes else ""),
                    "param": f"{name}={value}" if name else "",
                    "n": args.n,
                    "build_s": round(build, 1),
                    "recall_at_5": round(recall, 4),
                    "ms_per_query": round(latency_ms, 3),
                    "index_mb": index_mb,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| factory | search parameter | vectors | build s | recall@5 | ms/query | index MB |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['factory']} | {r['param']} | {r['n']:,} | {r['build_s']} | {r['recall_at_5']} | {r['ms_per_query']} | {r['index_mb']} |"
        )


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
    sentences = [
        s
        for key in sorted(data)
        for s in re.split(r"(?<=[.!?])\s+", (data[key].get("extract") or "").strip())
        if len(s.split()) >= 4
    ][: args.limit]
    rng = np.random.default_rng(0)
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]  # queries: a random sample
    emb = load_embedder("minilm")
    t = time.perf_counter()
    vectors = np.concatenate([emb.embed(sentences[i : i + 256]) for i in range(0, len(sentences), 256)])
    print(
        json.dumps(
            {
                "sentences": len(sentences),
                "dim": int(vectors.shape[1]),
                "texts_per_s": round(len(sentences) / (time.perf_counter() - t), 1),
            }
        ),
        flush=True,
    )
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
    # generation-time queries: the first 64 model tokens of references, 16 at a time (a batch of
    # 8 prompts of 2 chunks each)
    queries = [tok.decode(tok(r, add_special_tokens=False)["input_ids"][:64]) for r in refs[:160]]
    rows = []
    for name in args.embedders.split(","):
        emb = load_embedder(name, model_dir=args.model)
        t = time.perf_counter()
        vectors = np.concatenate([emb.embed(refs[i : i + 32]) for i in range(0, len(refs), 32)])
        per_s = len(refs) / (time.perf_counter() - t)
        index = build_index(vectors, "Flat")
        _, ids = index.search(emb.embed(titles), 5)
        recall = float(np.mean([j in set(owner[row]) for j, row in enumerate(ids)]))
        emb.embed(queries[:16])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(queries), 16):
            emb.embed(queries[i : i + 16])
        batch_ms = (time.perf_counter() - t) / (len(queries) / 16) * 1000
        rows.append(
            {
                "embedder": emb.spec.name,
                "dim": emb.spec.dim,
                "references": len(refs),
                "texts_per_s": round(per_s, 1),
                "ms_per_16_queries": round(batch_ms, 2),
                "title_recall_at_5": round(recall, 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| embedder | dim | references/s | ms per 16 chunk queries | title → article recall@5 |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['embedder']} | {r['dim']} | {r['texts_per_s']} | {r['ms_per_16_queries']} | {r['title_recall_at_5']} |"
        )


def bench_qa(args) -> None:
    """Retrieval precision on question files like m3 synth's: a question is answered by the
    reference whose document title it names."""
    from pathlib import Path

    from m3cli.bank import Bank
    from m3cli.evaluate import read_qa
    from m3cli.retrieval import Retriever, query_embedder

    questions = [q["question"] for q in read_qa(Path(args.qa), args.limit)]
    with Bank(Path(args.bank)) as bank:
        retriever = Retriever(bank, query_embedder(bank, encoder=args.embedder))
        t = time.perf_counter()
        hits = [h for i in range(0, len(questions), 16) for h in retriever.search(questions[i : i + 16], k=5)]
        ms = (time.perf_counter() - t) / (len(questions) / 16) * 1000
    row = {
        "bank": args.bank,
        "embedder": retriever.embedder.spec.name,
        "questions": len(questions),
        "right_at_1": round(float(np.mean([bool(h) and h[0].title in q for q, h in zip(questions, hits)])), 4),
        "right_in_5": round(float(np.mean([any(x.title in q for x in h) for q, h in zip(questions, hits)])), 4),
        "ms_per_16_questions": round(ms, 2),
    }
    # how sure the retriever is when it is right: the cosine margin of the first hit over the second
    margins = [h[0].score - h[1].score for q, h in zip(questions, hits) if len(h) > 1 and h[0].title in q]
    if margins:
        row["margin_when_right_median"] = round(float(np.median(margins)), 4)
        row["margin_when_right_p5"] = round(float(np.quantile(margins, 0.05)), 4)
    print(json.dumps(row))


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
    b.add_argument("--embedders", default="minilm,self", help="comma-separated: minilm, self, encoder or static dirs")
    q = sub.add_parser("qa")
    q.add_argument("--bank", required=True)
    q.add_argument("--qa", required=True, help="JSONL with a question field (m3 synth's qa_unseen.jsonl)")
    q.add_argument("--embedder", default=None, help="the encoder or static embedder dir the bank was indexed with")
    q.add_argument("--limit", type=int, default=500)
    w = sub.add_parser("wiki-vectors")
    w.add_argument("-o", "--output", required=True)
    w.add_argument("--limit", type=int, default=50_000, help="at most this many sentences")
    args = ap.parse_args()
    {"index": bench_index, "embedders": bench_embedders, "wiki-vectors": wiki_vectors, "qa": bench_qa}[args.what](args)


if __name__ == "__main__":
    main()
