"""Bank codecs side by side on one model and one corpus: encode throughput, bytes per
reference, reconstruction error, and what the model reads — the KL divergence between its
next-token distributions when reading memories decoded from bf16 and from each other codec.

    python bench/codecs.py --model out/smollm2 --corpus out/wiki.jsonl [--out out/bench-codecs]
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from m3cli.attention import Memory
from m3cli.bank import Bank
from m3cli.checkpoint import load_model_dir, load_tokenizer
from m3cli.encoding import encode_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("out/bench-codecs"))
    ap.add_argument(
        "--codecs",
        default="bf16,int8,vq,vq8",
        help="bf16, int8, vq (default sub-spaces), vqM (M sub-spaces = bytes per vector)",
    )
    ap.add_argument("--contexts", type=int, default=16, help="contexts used for the KL measurement")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows, banks = [], {}
    for codec in args.codecs.split(","):
        path = args.out / f"{codec}.m3bank"
        m = int(codec[2:]) if codec.startswith("vq") and codec[2:] else None
        t = time.perf_counter()
        s = encode_corpus(
            str(args.corpus),
            args.model,
            path,
            codec=codec[:2] if m else codec,
            overwrite=True,
            show_progress=False,
            vq_subquantizers=m,
        )
        seconds = time.perf_counter() - t
        banks[codec] = Bank(path)
        rows.append(
            {
                "codec": codec,
                "references": s.references,
                "seconds": round(seconds, 1),
                "refs_per_s": round(s.references / seconds, 1),
                "bytes_per_ref": banks[codec].record_bytes,
                "file_bytes": path.stat().st_size,
            }
        )
    model, tok = load_model_dir(args.model), load_tokenizer(args.model)
    base = banks["bf16"]
    n = base.n_refs
    sink = model.encode_prefix()
    # contexts: the opening words of references, each reading 5 memories (its own among them)
    picks = torch.randperm(n)[: args.contexts].tolist()
    exact = base.memories(range(n)).kv
    with torch.no_grad():
        for row in rows:
            bank = banks[row["codec"]]
            mem_all = bank.memories(range(n))
            row["rel_error"] = round(float((mem_all.kv - exact).norm() / exact.norm()), 4)
            kls = []
            for i in picks:
                slots = [i] + torch.randint(0, n, (4,)).tolist()
                ids = tok(" ".join(base.reference(i).text.split()[:12]), return_tensors="pt")["input_ids"]
                logits = {}
                for name, b in (("ref", base), ("codec", bank)):
                    enc = b.memories(slots)
                    logits[name] = model(ids, memory=Memory(enc.kv[None], enc.valid[None], sink))
                p = F.log_softmax(logits["ref"].float(), -1)
                q = F.log_softmax(logits["codec"].float(), -1)
                kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
            row["kl_vs_bf16"] = round(sum(kls) / len(kls), 6)
            row["compression_vs_bf16"] = round(base.record_bytes / bank.record_bytes, 2)
    print(json.dumps(rows, indent=1))
    print("\n| codec | bytes/ref | × vs bf16 | encode refs/s | rel. error | KL vs bf16 (nats/token) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['codec']} | {r['bytes_per_ref']:,} | {r['compression_vs_bf16']} | {r['refs_per_s']} | "
            f"{r['rel_error']} | {r['kl_vs_bf16']} |"
        )


if __name__ == "__main__":
    main()
