#!/usr/bin/env bash
# The memory reader's results table (docs/reader.md, issue #22): a model that reads memory, asked about knowledge it
# cannot hold in its weights, closed book / with memory / with RAG, on the same model and questions.
#
#   bash scripts/reader_eval.sh                       # the default model (SmolLM2 + m3's reader)
#   MODEL=out/smollm2 OUT=out/reader-eval-base bash scripts/reader_eval.sh   # SmolLM2 as converted
#   LIMIT=20 bash scripts/reader_eval.sh              # a quick look
#
# Question sets (scripts/reader_task.py; none of it is training text):
#   entities   held-out invented entities (people, companies, towns, books, species) whose facts
#              exist only in the evaluation bank, among 600 other entities' documents
#   countries  real country facts (capital, calling code, currency, internet domain, demonym) from
#              the `countryinfo` package, whose fact sheets and Wikipedia summaries are in the bank
# The evaluation bank is encoded by the model under test; 5 memories per chunk, chat template.
# Memory is evaluated twice: as the model reads by default (with the retriever-score prior it
# was trained with) and by content alone (--no-score-prior). Writes OUT/*.json and OUT/table.md.
set -euo pipefail
M3=${M3:-.venv/bin/m3}
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-default}
DATA=${DATA:-out/reader}
OUT=${OUT:-out/reader-eval}
LIMIT=${LIMIT:-200}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
[ -f "$DATA/task.json" ] || $PY scripts/reader_task.py -o "$DATA"
lim=(); [ "$LIMIT" -gt 0 ] && lim=(--limit "$LIMIT")

if [ ! -f "$OUT/eval.m3bank" ]; then
  echo "== m3 encode: the evaluation bank ($(wc -l < "$DATA/eval-kb.jsonl") documents) with $MODEL" >&2
  $M3 encode "$DATA/eval-kb.jsonl" -o "$OUT/eval.m3bank" --model "$MODEL" --resume -q
fi
for set in entities countries; do
  echo "== m3 eval: $set, closed book / memory / RAG" >&2
  text=(); [ $set = entities ] && text=(--text "$DATA/heldout-wiki.jsonl")  # perplexity of held-out Wikipedia text
  $M3 eval --model "$MODEL" --bank "$OUT/eval.m3bank" --qa "$DATA/$set.jsonl" --chat --modes none,memory,rag \
    --memories 5 "${lim[@]}" "${text[@]}" --json > "$OUT/$set.json"
  if $PY -c "import json,sys; sys.exit(0 if json.load(open('$OUT/$set.json'))['memory'].get('score_prior') else 1)"; then
    echo "== m3 eval: $set, memory read by content alone (--no-score-prior)" >&2
    $M3 eval --model "$MODEL" --bank "$OUT/eval.m3bank" --qa "$DATA/$set.jsonl" --chat --modes memory \
      --memories 5 --no-score-prior "${lim[@]}" --json > "$OUT/$set-content.json"
  fi
done
$PY - "$OUT" "$MODEL" <<'PY'
import json, os, sys
out, model = sys.argv[1], sys.argv[2]
rows = ["| question set | n | closed book | memory | memory, content only | RAG |", "|---|---|---|---|---|---|"]
for name in ("entities", "countries"):
    r = json.load(open(os.path.join(out, f"{name}.json")))
    c = os.path.join(out, f"{name}-content.json")
    content = f"{json.load(open(c))['memory']['accuracy']:.3f}" if os.path.exists(c) else "-"
    rows.append(f"| {name} | {r['none']['n']} | {r['none']['accuracy']:.3f} | {r['memory']['accuracy']:.3f} | "
                f"{content} | {r['rag']['accuracy']:.3f} |")
r = json.load(open(os.path.join(out, "entities.json")))
rows += ["", "| held-out Wikipedia text | closed book | memory | RAG |", "|---|---|---|---|",
         f"| perplexity ({r['none']['perplexity_tokens']} tokens) | {r['none']['perplexity']:.2f} | "
         f"{r['memory']['perplexity']:.2f} | {r['rag']['perplexity']:.2f} |"]
table = "\n".join(rows)
open(os.path.join(out, "table.md"), "w").write(f"model: {model}\n\n{table}\n")
print(table)
PY
