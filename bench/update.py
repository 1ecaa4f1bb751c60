"""What a bank update costs, side by side in one run: the same 100 documents added to a small
bank and to a large one (`m3 add`), then 10 of them removed (`m3 remove`), then each bank
compacted (`m3 compact`, the one step whose cost grows with the bank).

    .venv/bin/python bench/update.py --sizes 1000,100000 --add 100
    .venv/bin/python bench/update.py --sizes 200,2000 --add 20 --preset tiny   # a quick look

The large bank is `m3 bench`'s synthetic setup (a random-weight model of `--preset`, random
memories over pseudo-text, 4 references per document, a Flat index of random unit vectors under
MiniLM's spec); each smaller one is a copy of it cut down with `m3 remove` + `m3 compact`, so
every bank has the same model and tokenizer. The added documents (pseudo-text, new ids) are
encoded by that model and embedded by MiniLM. Every step runs as its own `m3` process, timed from
outside (wall) and by the command itself (`seconds` in its JSON). Prints one JSON line per bank,
then the ratios of the largest bank's times to the smallest one's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def m3(*args: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "m3cli", *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"m3 {' '.join(args)} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000", help="references in each bank, comma-separated")
    ap.add_argument("--add", type=int, default=100, help="documents added to each bank")
    ap.add_argument("--preset", default="small", help="model preset of the synthetic banks")
    ap.add_argument("--workdir", type=Path, default=Path("out/bench-update"))
    args = ap.parse_args()

    from m3cli.bank_update import compact_bank, remove_documents
    from m3cli.bench import pseudo_texts, synthetic_setup

    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.workdir / "added.jsonl"
    texts = pseudo_texts(args.add, seed=1)
    corpus.write_text(
        "".join(json.dumps({"id": f"added-{i}", "title": f"added {i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    sizes = sorted(int(s) for s in args.sizes.split(","))
    t0 = time.perf_counter()
    model, largest = synthetic_setup(
        args.preset, sizes[-1], args.workdir, text="pseudo", log=lambda m: print(m, file=sys.stderr)
    )
    banks = {sizes[-1]: largest}
    for n in sizes[:-1]:  # the same bank cut down: same model, same tokenizer, same kind of text
        bank = args.workdir / f"bank-{n}.m3bank"
        shutil.copy(largest, bank)
        remove_documents(bank, [f"syn-{j}" for j in range(-(-n // 4), -(-sizes[-1] // 4))])
        compact_bank(bank)
        banks[n] = bank
    print(json.dumps({"setup_s": round(time.perf_counter() - t0, 1)}), file=sys.stderr)
    results = {}
    for n in sizes:
        bank = banks[n]
        size0 = bank.stat().st_size
        added, add_wall = m3("add", str(bank), str(corpus), "-m", str(model), "-q")
        size1 = bank.stat().st_size
        removed, remove_wall = m3("remove", str(bank), *[a for i in range(10) for a in ("--doc", f"added-{i}")])
        compacted, compact_wall = m3("compact", str(bank), "-q")
        row = {
            "references": n,
            "bank_bytes": size0,
            "add_s": added["seconds"],
            "add_wall_s": round(add_wall, 2),
            "added_documents": added["added_documents"],
            "added_references": added["added_references"],
            "bytes_appended": size1 - size0,
            "remove_wall_s": round(remove_wall, 2),
            "compact_s": compacted["seconds"],
            "compact_wall_s": round(compact_wall, 2),
        }
        print(json.dumps(row), flush=True)
        results[n] = row
    if len(sizes) >= 2:
        small, large = results[sizes[0]], results[sizes[-1]]
        print(
            json.dumps(
                {
                    "bank_size_ratio": round(large["references"] / small["references"], 1),
                    "add_time_ratio": round(large["add_s"] / small["add_s"], 2),
                    "add_wall_ratio": round(large["add_wall_s"] / small["add_wall_s"], 2),
                    "remove_wall_ratio": round(large["remove_wall_s"] / small["remove_wall_s"], 2),
                    "compact_time_ratio": round(large["compact_s"] / small["compact_s"], 2),
                }
            )
        )


if __name__ == "__main__":
    main()
