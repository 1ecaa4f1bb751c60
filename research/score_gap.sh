#!/usr/bin/env bash
# `--max-score-gap` on the sample model (README, Training): the gap is chosen on 500 questions about
# *seen* people, then measured on 500 about unseen people, with how many references a question's
# prompt chunk keeps. Needs `make demo` first (out/demo/kb.m3bank). About 1.5 minutes on 2 CPU cores.
#
#   bash research/score_gap.sh > bench/results/cpu-max-score-gap.jsonl
set -euo pipefail
M3=${M3:-.venv/bin/m3}
PY=${PY:-.venv/bin/python}
D=${D:-out/demo}
GAPS=${GAPS:-0.01 0.02 0.03 0.05 0.08}
CHOSEN=${CHOSEN:-0.03}
export HF_HUB_OFFLINE=1
run() {  # label gap qa modes
  local r
  r=$($M3 eval --model samples/model --bank "$D/kb.m3bank" --qa "$D/synth/$3" --limit 500 --modes "$4" \
        ${2:+--max-score-gap "$2"} --json)
  echo "{\"questions\": \"$1\", \"max_score_gap\": ${2:-null}, \"eval\": $r}"
}
for g in $GAPS; do run seen "$g" qa_seen.jsonl memory; done
run unseen "" qa_unseen.jsonl none,memory,rag
run unseen "$CHOSEN" qa_unseen.jsonl none,memory,rag
head -500 "$D/synth/qa_unseen.jsonl" \
  | $PY -c 'import json, sys; [print("Question: " + json.loads(l)["question"] + " Answer:") for l in sys.stdin]' \
  | $M3 search "$D/kb.m3bank" - -k 5 --max-overlap 0.67 --max-score-gap "$CHOSEN" --json \
  | $PY -c '
import collections, json, sys
n = [len(json.loads(l)["results"]) for l in sys.stdin]
print(json.dumps({"questions": "unseen", "max_score_gap": float(sys.argv[1]), "references_kept_mean": round(sum(n) / len(n), 3),
                  "references_kept_histogram": {str(k): v for k, v in sorted(collections.Counter(n).items())}}))' "$CHOSEN"
