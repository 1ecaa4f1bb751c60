"""Where a one-question `m3 generate --bank BANK` spends its time before and while it answers:
each stage of the command's own path, timed in order in one fresh process (run it several
times; the first stages are imports, so only a fresh process measures them).

    python bench/startup.py kb.m3bank "Where was Ilsa Varenkov born?"
    python bench/startup.py kb.m3bank "…" --model DIR --json     # one JSON line (docs/startup.md)
"""

import argparse
import json
import time
from pathlib import Path

T0 = time.perf_counter()
rows: list[tuple[str, float]] = []


def mark(stage: str, since: list[float]) -> None:
    now = time.perf_counter()
    rows.append((stage, now - since[0]))
    since[0] = now


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bank")
    ap.add_argument("prompt")
    ap.add_argument("--model", default=None)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    since = [T0]
    import torch  # noqa: F401

    mark("import torch", since)
    import m3cli.cli  # noqa: F401
    from m3cli.bank import Bank
    from m3cli.checkpoint import load_model_dir, load_tokenizer, model_fingerprint
    from m3cli.default_model import resolve_model
    from m3cli.generate import Generator, Options
    from m3cli.retrieval import Retriever, query_embedder

    mark("import m3cli (cli, bank, generate, retrieval)", since)
    model_dir = Path(a.model) if a.model else resolve_model(None, a.bank)
    bank = Bank(a.bank)
    mark("resolve the model, open the bank", since)
    fingerprint = model_fingerprint(model_dir)
    assert fingerprint == bank.header["m3.model.fingerprint"]
    mark("model fingerprint (hash of the weights)", since)
    tokenizer = load_tokenizer(model_dir)
    mark("tokenizer (imports transformers)", since)
    net = load_model_dir(model_dir)
    mark("model weights (safetensors)", since)
    emb = query_embedder(bank, model_dir=model_dir, device=torch.device("cpu"), model=net, tokenizer=tokenizer)
    mark("query embedder (MiniLM)", since)
    retriever = Retriever(bank, emb)
    mark("FAISS index", since)
    gen = Generator(net, tokenizer, retriever)
    out = gen.generate([a.prompt], Options(mode="memory", max_new_tokens=a.n))
    mark(f"retrieve + prefill + {a.n} new tokens", since)
    total = time.perf_counter() - T0
    if a.json:
        print(json.dumps({"stages": dict(rows), "total_s": total, "text": out[0].text}))
        return
    for stage, s in rows:
        print(f"{s:7.3f} s  {s / total:6.1%}  {stage}")
    print(f"{total:7.3f} s  total (interpreter start-up not included)")


if __name__ == "__main__":
    main()
