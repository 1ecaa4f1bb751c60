#!/usr/bin/env bash
# The demo run by `make demo`: the shipped sample model (samples/model, trained by `m3 pretrain`;
# see samples/README.md) answers questions about people whose facts exist only in the bank; then
# the default model (SmolLM2 + m3's memory reader) answers from documents it never saw.
# Offline; about three minutes on a 2-core CPU after set-up.
set -euo pipefail
M3=${M3:-.venv/bin/m3}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/demo}
MODEL=samples/model
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"

echo "== m3 inspect $MODEL: the sample Memory3 model"
$M3 inspect "$MODEL"

echo; echo "== m3 synth: the invented people the sample model was trained on (seed 0) and 10% it never saw"
$M3 synth -o "$OUT/synth" --people 2000 --seed 0 --force

echo; echo "== m3 encode: their biographies -> $OUT/kb.m3bank (sparse memories by the sample model, MiniLM index)"
$M3 encode "$OUT/synth/kb.parquet" -o "$OUT/kb.m3bank" --model "$MODEL" --force -q
$M3 inspect "$OUT/kb.m3bank" --verify

QUESTION=$($PY -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["question"])' "$OUT/synth/qa_unseen.jsonl")
echo; echo "== m3 search: \"$QUESTION\" (a person the model never saw in training; namesakes come back too)"
$M3 search --bank "$OUT/kb.m3bank" "$QUESTION" --memories 3

echo; echo "== m3 generate --explain: the answer, and the memories it read with the attention each got"
$M3 generate --model "$MODEL" --bank "$OUT/kb.m3bank" --explain -n 8 "Question: $QUESTION Answer:"

echo; echo "== m3 eval: 200 questions about unseen people, closed book / with memory / with RAG"
$M3 eval --model "$MODEL" --bank "$OUT/kb.m3bank" --qa "$OUT/synth/qa_unseen.jsonl" --limit 200 --show 5

echo; echo "== m3 eval --no-score-prior: the same questions, the retriever's scores hidden from the model (it reads its 5 memories by content alone, as the paper's Eq. 4)"
$M3 eval --model "$MODEL" --bank "$OUT/kb.m3bank" --qa "$OUT/synth/qa_unseen.jsonl" --limit 200 --modes memory \
  --no-score-prior --show 0

echo; echo "== m3 eval --memories 1: the same questions with only the retriever's top reference in memory"
$M3 eval --model "$MODEL" --bank "$OUT/kb.m3bank" --qa "$OUT/synth/qa_unseen.jsonl" --limit 200 --modes memory \
  --memories 1 --show 0

echo; echo "== m3 eval --max-score-gap 0.03: each chunk keeps only the references within 0.03 of its best (most keep one)"
$M3 eval --model "$MODEL" --bank "$OUT/kb.m3bank" --qa "$OUT/synth/qa_unseen.jsonl" --limit 200 --modes memory,rag \
  --max-score-gap 0.03 --show 0

echo; echo "== The default model: SmolLM2-135M-Instruct with m3's memory reader, on documents it never saw"
echo "   (20 invented entities held out of its training, 20 countries' real facts, 40 other documents)"
$PY scripts/reader_task.py -o "$OUT/reader" --entities 300 --heldout 40 --wiki-train 100 --wiki-heldout 20 \
  --distractors 40 > /dev/null
$PY - "$OUT/reader" <<'PY'
import json, sys
d = sys.argv[1]
load = lambda name: [json.loads(x) for x in open(f"{d}/{name}", encoding="utf-8")]
kb, qa = load("eval-kb.jsonl"), load("entities.jsonl")[:20] + load("countries.jsonl")[:20]
asked = {q["title"] for q in qa} | {q["title"].removesuffix(" (facts)") for q in qa}
docs = [x for x in kb if x["title"] in asked]
docs += [x for x in kb if x["title"] not in asked and x["id"].split(":")[0] in ("person", "town", "book")][:40]
with open(f"{d}/demo-kb.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(x) + "\n" for x in docs)
with open(f"{d}/demo-qa.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(x) + "\n" for x in qa)
PY
$M3 encode "$OUT/reader/demo-kb.jsonl" -o "$OUT/real.m3bank" --model default --force -q
QUESTION=$($PY -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["question"])' "$OUT/reader/demo-qa.jsonl")
echo; echo "== m3 generate --chat: \"$QUESTION\", closed book, then with the bank"
env -u M3_BANK $M3 generate --model default --chat -n 24 "$QUESTION"
$M3 generate --model default --chat -n 24 --bank "$OUT/real.m3bank" "$QUESTION"
echo; echo "== m3 eval --chat: those 40 questions, closed book / with memory / with RAG (the full evaluation: make reader-eval)"
$M3 eval --model default --bank "$OUT/real.m3bank" --qa "$OUT/reader/demo-qa.jsonl" --chat --memories 5 --show 3
