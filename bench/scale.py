"""A bank set of millions of references at the default model's memory shape, and what it costs:
write throughput, index build time and RAM per reference, recall@5 and query latency, and the
latency of loading one query's 5 memories with a cold page cache.

    .venv/bin/python bench/scale.py --refs 5000000 --shards 10 --workdir out/scale
    .venv/bin/python bench/scale.py --refs 20000 --shards 2 --workdir /tmp/scale   # a quick look

The references are synthetic (random `vq` codes of the default model's shape, 8 bytes per
vector: 5,760 bytes per reference; positions inside a 40-token text), so nothing is encoded by a
model: this measures the bank, not the encoder (`bench/bank.py` measures encoding). Their
embeddings are 384-d unit vectors drawn around 4,096 random centres (so that nearest neighbours
mean something), stored in each shard; the set's index is what `m3 index` builds (`auto`:
IVF-PQ beyond 2 million references). Each shard is written as any bank (spooled, verified,
renamed), two at a time. Checks free disk space first. Prints one JSON line per step and a
summary; `--keep` keeps the set (otherwise it is deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 384
CENTRES = 4096
SUBQUANTIZERS = 8


def log(**row) -> None:
    print(json.dumps(row), flush=True)


def centres(seed: int = 0) -> np.ndarray:
    c = np.random.default_rng(seed).standard_normal((CENTRES, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def vectors(first: int, n: int, seed: int = 1) -> np.ndarray:
    """The embeddings of the n references of the shard that starts at reference `first`."""
    rng = np.random.default_rng([seed, first])
    c = centres()
    x = c[rng.integers(CENTRES, size=n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shard(path: Path, first: int, n: int, header: dict, shape: tuple, seed: int) -> dict:
    """One shard of n synthetic references (4 per document), written through the bank writer's
    own layout and verification, then its embeddings added in place."""
    import tempfile

    from m3cli.bank import _DOC, _REF
    from m3cli.bank_writer import update_bank, write_bank_file
    from m3cli.embed import EmbedderSpec
    from m3cli.retrieval import EMB_SECTION

    L, _, H, K, d = shape
    rng = np.random.default_rng([seed, first])
    t0 = time.perf_counter()
    prefix = len(header["m3.model.reference_prefix_ids"])
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.scale-", dir=path.parent) as tmp:
        tmp = Path(tmp)
        files = {name: open(tmp / name, "wb") for name in ("refs.table", "refs.text", "docs.table", "docs.strings")}
        text_off = str_off = 0
        tokens = 40
        for i in range(n):
            text = f"Synthetic reference {first + i}: a sentence of about forty tokens.".encode()
            files["refs.text"].write(text)
            files["refs.table"].write(_REF.pack(text_off, len(text), tokens, i // 4, i % 4, b"\0" * 8))
            text_off += len(text)
            if i % 4 == 3 or i == n - 1:
                j = i // 4
                strings = [f"syn-{first // 4 + j}".encode(), f"synthetic {first // 4 + j}".encode(), b"bench/scale.py"]
                files["docs.strings"].write(b"".join(strings))
                files["docs.table"].write(_DOC.pack(str_off, *(len(s) for s in strings), 4 * j, i - 4 * j + 1, 0))
                str_off += sum(len(s) for s in strings)
        for f in files.values():
            f.close()
        with open(tmp / "kv.data", "wb") as f, open(tmp / "kv.positions", "wb") as g:
            for start in range(0, n, 4096):
                m = min(4096, n - start)
                f.write(rng.integers(0, 256, size=(m, L * 2 * H * K * SUBQUANTIZERS), dtype=np.uint8).tobytes())
                pos = np.sort(rng.random((m, L, H, tokens)).argsort(-1)[..., :K], axis=-1) + prefix
                g.write(pos.astype("<i2").tobytes())
        books = rng.standard_normal((L, 2, SUBQUANTIZERS, 256, d // SUBQUANTIZERS)).astype("<f4") * 0.5
        (tmp / "codec.vq").write_bytes(books.tobytes())
        full = {
            **header,
            "m3.format": "m3bank",
            "m3.bank.references": n,
            "m3.bank.documents": -(-n // 4),
            "m3.bank.tokens": n * tokens,
            "m3.memory.codec": "vq",
            "m3.memory.vq.subquantizers": SUBQUANTIZERS,
            "m3.memory.record_bytes": L * 2 * H * K * SUBQUANTIZERS,
        }
        names = ["refs.table", "refs.text", "docs.table", "docs.strings", "kv.data", "kv.positions", "codec.vq"]
        write_bank_file(path, full, [(name, tmp / name, "raw", (tmp / name).stat().st_size) for name in names])
    written = time.perf_counter() - t0
    spec = EmbedderSpec.from_header(
        {
            "m3.embed.name": "minilm",
            "m3.embed.dim": DIM,
            "m3.embed.pooling": "mean",
            "m3.embed.fingerprint": "sha256:" + "0" * 64,
        }
    )
    update_bank(path, {EMB_SECTION: vectors(first, n).astype("<f2").tobytes()}, spec.header())
    return {"shard": path.name, "references": n, "write_s": round(written, 1), "bytes": path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=5_000_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path("out/scale"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--shard", nargs=3, type=int, help=argparse.SUPPRESS)  # internal: write shard (index, first, n)
    args = ap.parse_args()

    from m3cli.checkpoint import model_fingerprint, read_config
    from m3cli.default_model import default_model
    from m3cli.encoding import bank_header

    model_dir = default_model()
    cfg = read_config(model_dir)
    header = bank_header(cfg, model_fingerprint(model_dir, cfg), "default")
    kbset = args.workdir / "kb.m3set"
    per = -(-args.refs // args.shards)
    if args.shard:  # a worker process
        k, first, n = args.shard
        from m3cli.bankset import shard_name

        log(**write_shard(kbset / shard_name(k, args.shards), first, n, header, cfg.memory_shape, seed=7))
        return

    from m3cli.bank import record_bytes

    rec = record_bytes("vq", cfg.memory_shape, SUBQUANTIZERS)
    need = args.refs * (rec + cfg.n_mem_layers * cfg.n_kv_heads * cfg.memory_top_k * 2 + DIM * 2 + 130)
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if need + 2 * need // args.shards > free * 0.95:
        sys.exit(f"needs about {need / 1e9:.1f} GB (+ one shard's spool) and {free / 1e9:.1f} GB are free")
    log(step="plan", refs=args.refs, shards=args.shards, bytes_per_reference=rec, estimated_gb=round(need / 1e9, 1))
    from m3cli.bankset import clear_set, shard_name, write_manifest

    clear_set(kbset)
    kbset.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(k, k * per, min(per, args.refs - k * per)) for k in range(args.shards) if k * per < args.refs]
    running: list[subprocess.Popen] = []
    for k, first, n in jobs:  # two writers at a time (one per core)
        if len(running) == 2:
            running.pop(0).wait()
        running.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--refs",
                    str(args.refs),
                    "--shards",
                    str(args.shards),
                    "--workdir",
                    str(args.workdir),
                    "--shard",
                    str(k),
                    str(first),
                    str(n),
                ]
            )
        )
    for p in running:
        p.wait()
    write_manifest(kbset, [kbset / shard_name(k, args.shards) for k, _, _ in jobs])
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in kbset.iterdir())
    log(
        step="write",
        seconds=round(wall, 1),
        refs_per_s=round(args.refs / wall),
        mb_per_s=round(size / wall / 1e6),
        gb=round(size / 1e9, 2),
    )

    # the index: what `m3 index` builds, with a stand-in embedder of MiniLM's spec (the vectors are stored)
    from m3cli.bank import Bank
    from m3cli.bankset import index_set
    from m3cli.embed import EmbedderSpec

    class Stored:  # never asked to embed: every shard holds its embeddings
        spec = EmbedderSpec.from_header(
            {
                "m3.embed.name": "minilm",
                "m3.embed.dim": DIM,
                "m3.embed.pooling": "mean",
                "m3.embed.fingerprint": "sha256:" + "0" * 64,
            }
        )
        hint = "minilm"

        def embed(self, texts):  # pragma: no cover - a shard without embeddings would be a bug here
            raise RuntimeError("bench/scale.py: a shard has no stored embeddings")

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    info = index_set(kbset, Stored(), show_progress=False)
    build = time.perf_counter() - t0
    log(
        step="index",
        seconds=round(build, 1),
        factory=info["factory"],
        index_bytes=info["index_bytes"],
        bytes_per_reference=round(info["index_bytes"] / args.refs, 1),
        peak_rss_gb=round(max(rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1e6, 2),
    )

    import faiss

    from m3cli.retrieval import Retriever

    rng = np.random.default_rng(3)
    picks = np.sort(rng.choice(args.refs, size=args.queries, replace=False))
    with Bank(kbset) as bset:
        from m3cli.retrieval import embeddings_of

        exact = faiss.IndexFlatIP(DIM)
        stored = []
        for seg in bset.segments:
            part = embeddings_of(bset, seg)
            exact.add(part)
            mine = picks[(picks >= seg.first_ref) & (picks < seg.first_ref + seg.n_refs)]
            stored.append(part[mine - seg.first_ref])
        q = np.concatenate(stored)  # each query: a stored embedding, perturbed
        q = q + 0.2 * rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(DIM)
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        _, truth = exact.search(q, 5)
        del exact
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        retr = Retriever(bset, Stored())
        faiss.omp_set_num_threads(1)
        ivf = faiss.try_extract_index_ivf(retr.index)
        probes = [ivf.nprobe, 4 * ivf.nprobe] if ivf is not None else [0]
        for nprobe in probes:
            if ivf is not None:
                ivf.nprobe = nprobe
            lat, found = [], []
            for i in range(args.queries):
                t = time.perf_counter()
                hits = retr.search([""], k=5, vectors=q[i : i + 1])[0]
                lat.append(time.perf_counter() - t)
                found.append([h.ref for h in hits])
            recall = float(np.mean([len(set(f) & set(t)) / 5 for f, t in zip(found, truth.tolist())]))
            source = float(np.mean([int(p) in f for p, f in zip(picks, found)]))
            log(
                step="search",
                nprobe=nprobe,
                recall_at_5=round(recall, 3),  # of the exact top 5
                source_in_top5=round(source, 3),  # the reference the query was made from
                p50_ms=round(1000 * np.percentile(lat, 50), 2),
                p99_ms=round(1000 * np.percentile(lat, 99), 2),
                threads=1,
            )
        log(
            step="ram",
            rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            rss_before_index_gb=round(rss / 1e6, 2),
        )
        load = []
        for ids in found:
            bset.drop_cache()
            t = time.perf_counter()
            bset.memories(ids)
            load.append(time.perf_counter() - t)
        log(
            step="memory_load_cold",
            p50_ms=round(1000 * np.percentile(load, 50), 2),
            p99_ms=round(1000 * np.percentile(load, 99), 2),
            memories=5,
        )
        problems = bset.verify() if args.refs <= 100_000 else []
        log(step="verify", problems=problems[:3], skipped=args.refs > 100_000)
    if not args.keep:
        shutil.rmtree(kbset)
    os.sync()


if __name__ == "__main__":
    main()
