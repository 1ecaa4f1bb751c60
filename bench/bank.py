"""Bank figures, side by side in one run:

overhead  memory-encoding throughput vs a plain forward pass of the same model on the same
          references (the encoder runs only the memory layers, plus token selection)
codecs    bytes per reference per codec for the `small` and `memory3-2.4b` shapes
latency   load + decode 5 random memories from a bank of N references (warm page cache)

  python bench/bank.py --model out/smollm2 --corpus out/wiki150.jsonl --refs 100000
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from m3cli.bank import Bank, record_bytes
from m3cli.bank_writer import BankWriter
from m3cli.config import preset
from m3cli.vq import default_subquantizers


def overhead(model_dir: Path, corpus: Path, batch: int = 16) -> dict:
    from m3cli.checkpoint import load_model_dir, load_tokenizer
    from m3cli.corpus import read_corpus, split_references

    model, tok = load_model_dir(model_dir), load_tokenizer(model_dir)
    cfg = model.config
    refs = [ids for d in read_corpus(str(corpus)) for _, ids in split_references(d.text, tok, cfg.reference_length)]
    batches = []
    for s in range(0, len(refs), batch):
        chunk = refs[s : s + batch]
        n = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), n, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
        batches.append((ids, torch.tensor([len(r) for r in chunk])))
    prefix = torch.tensor([cfg.reference_prefix_ids])
    timings = {}
    with torch.inference_mode():
        for name in ("forward", "encode", "forward", "encode"):  # interleaved, second round counts
            t = time.perf_counter()
            for ids, lengths in batches:
                if name == "forward":  # the same [prefix, reference] through the whole model
                    model(torch.cat([prefix.expand(len(ids), -1), ids], 1))
                else:
                    model.encode_references(ids, lengths)
            timings[name] = len(refs) / (time.perf_counter() - t)
    return {
        "references": len(refs),
        "forward_refs_per_s": round(timings["forward"], 2),
        "encode_refs_per_s": round(timings["encode"], 2),
        "encode_over_forward": round(timings["encode"] / timings["forward"], 3),
    }


def codec_sizes() -> list[dict]:
    rows = []
    for name in ("small", "memory3-2.4b"):
        shape = preset(name).memory_shape
        bf16 = record_bytes("bf16", shape)
        d = shape[4]
        for codec, m in (("bf16", None), ("int8", None), ("vq", default_subquantizers(d)), ("vq", d // 8)):
            b = record_bytes(codec, shape, m)
            rows.append(
                {
                    "shape": name,
                    "codec": codec + (f" M={m}" if m else ""),
                    "bytes_per_ref": b,
                    "x_vs_bf16": round(bf16 / b, 2),
                }
            )
    return rows


def latency(path: Path, codec: str, shape, n: int, trials: int = 300) -> dict:
    rng = np.random.default_rng(0)
    L, _, H, K, _ = shape
    if not path.exists():
        header = {
            "m3.memory.layers": L,
            "m3.memory.layer_ids": list(range(L)),
            "m3.memory.kv_heads": H,
            "m3.memory.top_k": K,
            "m3.memory.head_dim": shape[4],
            "m3.memory.reference_length": 128,
            "m3.model.fingerprint": "sha256:synthetic",
            "m3.model.name": "synthetic",
            "m3.model.reference_prefix": "Reference:",
            "m3.model.reference_prefix_ids": [1, 2],
            "m3.model.rope_theta": 10000.0,
        }
        pos = torch.arange(2, 2 + L * H * K).reshape(L, H, K).to(torch.int16) % 100 + 2
        base = torch.randn(64, *shape)
        with BankWriter(path, header, codec, shape, overwrite=True) as w:
            for i in range(n):
                w.add_document(str(i), "", "", [("x", 100, base[i % 64] + 0.01 * i % 1, pos)])
            w.finish()
    with Bank(path) as bank:
        samples = []
        for _ in range(trials):
            idx = rng.integers(0, bank.n_refs, 5)
            t = time.perf_counter()
            bank.memories(idx)
            samples.append((time.perf_counter() - t) * 1000)
        return {
            "codec": codec,
            "references": bank.n_refs,
            "file_mb": round(bank.size / 2**20),
            "ms_p50": round(float(np.median(samples)), 3),
            "ms_mean": round(float(np.mean(samples)), 3),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--refs", type=int, default=100_000)
    ap.add_argument("--paper-refs", type=int, default=10_000, help="references in the paper-shape banks")
    ap.add_argument("--out", type=Path, default=Path("out/bench-bank"))
    ap.add_argument("--skip-overhead", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    o = None if args.skip_overhead else overhead(args.model, args.corpus)
    print(json.dumps(o), flush=True)
    sizes = codec_sizes()
    lat = []
    for name, n in (("small", args.refs), ("memory3-2.4b", args.paper_refs)):
        for codec in ("bf16", "int8", "vq"):
            row = latency(args.out / f"{name}-{codec}-{n}.m3bank", codec, preset(name).memory_shape, n)
            row["shape"] = name
            lat.append(row)
            print(json.dumps(row), flush=True)
    if o:
        print(
            f"\nencode vs plain forward ({o['references']} references): {o['encode_refs_per_s']} vs "
            f"{o['forward_refs_per_s']} refs/s = {o['encode_over_forward']}x"
        )
    print("\n| shape | codec | bytes/ref | × vs bf16 |\n|---|---|---|---|")
    for r in sizes:
        print(f"| {r['shape']} | {r['codec']} | {r['bytes_per_ref']:,} | {r['x_vs_bf16']} |")
    print(
        "\n| shape | codec | references | file MB | load+decode 5 memories, ms p50 | mean |\n|---|---|---|---|---|---|"
    )
    for r in lat:
        print(
            f"| {r['shape']} | {r['codec']} | {r['references']:,} | {r['file_mb']:,} | {r['ms_p50']} | {r['ms_mean']} |"
        )


if __name__ == "__main__":
    main()
