"""A memory-mode prompt's prefill, side by side in one process: closed book, memory read the
previous way (batch < 4: one call through block masks; else a chunk at a time) and memory read
chunk-aligned (`aligned_reader_attention`), interleaved, the median of --repeats each. The
default model and the bench's prompts (256 tokens of the bank's own text, 5 memories per chunk).
--cite measures citations in both memory forms (what `--json`, `m3 serve` and the Python API do).

    .venv/bin/python bench/prefill.py --bank out/bench27/wiki-default.m3bank --batch-size 8 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics

import m3cli.model as model_mod
from m3cli.api import Bank, Model
from m3cli.bench import bench_prompts
from m3cli.generate import Options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cite", action="store_true", help="measure each memory's attention share (citations)")
    a = ap.parse_args()
    bank = Bank.open(a.bank)
    gen = Model.load(bank=bank).generator(bank)
    B = a.batch_size
    texts, ids = bench_prompts(gen.retriever.bank, gen.tokenizer, B, a.prompt_len)
    aligned = model_mod.Memory3Model.reads_aligned

    def once(mode: str, how: str) -> float:
        model_mod.Memory3Model.reads_aligned = aligned if how == "aligned" else (lambda *_, **__: False)
        gen.memory_cache._items.clear()
        gen.timings.clear()
        opts = Options(mode=mode, max_new_tokens=1, stop_at_eos=False, chat=False, cite=a.cite)
        gen.generate(texts[:B], opts, forced_ids=ids[:B])
        return gen.timings["prefill"]

    cases = [("none", "-"), ("memory", "before"), ("memory", "aligned")]
    for c in cases:  # warm-up
        once(*c)
    times: dict[tuple, list[float]] = {c: [] for c in cases}
    for _ in range(a.repeats):
        for c in cases:
            times[c].append(once(*c))
    base = statistics.median(times[cases[0]])
    for c in cases:
        t = statistics.median(times[c])
        cited = " (citations)" if a.cite and c[0] == "memory" else ""
        print(f"batch {B}  {c[0]:6s} {c[1]:7s}  prefill {t:.3f} s  {t / base:.3f}x closed book{cited}")


if __name__ == "__main__":
    main()
