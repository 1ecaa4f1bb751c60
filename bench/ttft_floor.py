"""The least time memory can add to a prompt's first token, beside what it adds, in one process.

Memory's first token (`m3 bench`'s `ttft`) costs what closed book's does plus, at least, three
things no rewrite of the reader removes: retrieval (embedding the prompt chunks' queries with the
retriever's encoder, MiniLM, and the index search), reading the memories from the bank, and the
attention of every prompt token to its chunk's memory keys in every memory layer (the fused CPU
kernel as `aligned_reader_attention` calls it, timed alone with the model's shapes). None of them
can overlap with the prefill: its first layer already reads the memories. Printed per batch size:
the medians (the first two as generation's own timers report them in the memory runs), the
ratio to closed book those three alone would give (the floor) and the ratio measured,
interleaved, --repeats times each. The default model and the bench's prompts (256 tokens of the
bank's own text, 5 memories per 64-token chunk).

    .venv/bin/python bench/ttft_floor.py --bank out/bench27/wiki-default.m3bank --batch-size 1,8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from m3cli.api import Bank, Model
from m3cli.attention import _FLASH_CPU
from m3cli.bench import bench_prompts
from m3cli.generate import Options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--batch-size", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--memories", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    if _FLASH_CPU is None:
        raise SystemExit("this torch build lacks the fused CPU attention kernel the floor is timed with")
    bank = Bank.open(a.bank)
    gen = Model.load(bank=bank).generator(bank)
    cfg = gen.cfg
    batches = [int(b) for b in a.batch_size.split(",")]
    texts, ids = bench_prompts(gen.retriever.bank, gen.tokenizer, max(batches), a.prompt_len)
    opts = Options(mode="none", max_new_tokens=1, stop_at_eos=False, memories=a.memories, chat=False)

    def first_token(B: int, mode: str) -> tuple[float, dict]:
        gen.memory_cache._items.clear()  # as `m3 bench`: memories read from the bank each run
        gen.timings.clear()
        t0 = time.perf_counter()
        gen.generate(texts[:B], dataclasses.replace(opts, mode=mode), forced_ids=ids[:B])
        return time.perf_counter() - t0, dict(gen.timings)

    def memory_attention(B: int) -> float:
        """Every memory layer's fused call: each chunk's tokens (q + dq) against its own chunk's
        memory keys, the chunks as rows, with the retriever-score bias as the mask."""
        n = -(-a.prompt_len // cfg.chunk_length)
        per = a.memories * cfg.memory_top_k
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qf = torch.randn(B * n, H, min(cfg.chunk_length, a.prompt_len), D)
        kf, vf = torch.randn(B * n, Hkv, per, D), torch.randn(B * n, Hkv, per, D)
        bias = torch.zeros(B * n, H, 1, per)
        with torch.inference_mode():
            _FLASH_CPU(qf, kf, vf, attn_mask=bias)
            t0 = time.perf_counter()
            for _ in range(cfg.n_mem_layers):
                _FLASH_CPU(qf, kf, vf, attn_mask=bias)
            return time.perf_counter() - t0

    for B in batches:
        for mode in ("none", "memory"):  # warm-up
            first_token(B, mode)
        runs: dict[str, list[float]] = {k: [] for k in ("none", "memory", "retrieval", "memory_load", "attention")}
        for _ in range(a.repeats):
            runs["none"].append(first_token(B, "none")[0])
            took, timings = first_token(B, "memory")
            runs["memory"].append(took)
            runs["retrieval"].append(timings.get("retrieval", 0.0))
            runs["memory_load"].append(timings.get("memory_load", 0.0))
            runs["attention"].append(memory_attention(B))
        med = {k: statistics.median(v) for k, v in runs.items()}
        floor = med["none"] + med["retrieval"] + med["memory_load"] + med["attention"]
        row = {
            "batch": B,
            "ttft_none_s": round(med["none"], 4),
            "ttft_memory_s": round(med["memory"], 4),
            "retrieval_s": round(med["retrieval"], 4),
            "memory_load_s": round(med["memory_load"], 4),
            "memory_attention_s": round(med["attention"], 4),
            "floor_ratio": round(floor / med["none"], 3),
            "measured_ratio": round(med["memory"] / med["none"], 3),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
