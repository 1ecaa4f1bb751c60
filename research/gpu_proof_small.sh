#!/usr/bin/env bash
# Issue #6 on a GPU: does a wider model than the proof's `mini` learn to tell its memories apart?
#
# The proof's task (`m3 synth --people 2000 --seed 0`: 200 unseen people, namesakes among every
# question's 5 retrieved memories) with the `small` preset (hidden 384, 8 layers, ~16x mini's
# non-embedding parameters) instead of `mini`, trained on one GPU:
#   warmup -> encode -> continual stage 1 (a top-1 curriculum, then each chunk reads its own top-5)
#   -> encode -> eval -> continual stage 3 (top-1 + the 4 references its title retrieves, the
#   inference-time namesakes, `--distractors title`; S3=0 skips it) -> encode -> eval
#   [-> with FRESH=N: FRESH_STEPS steps, title neighbours, on the question-answer text of N people
#   the model has never seen, whose facts are only in a bank of theirs (`m3 synth --qa-only --seed
#   11`; FRESH_STEPS=2000 is about 6 passes over 20,000 people), so answers can hardly be
#   memorised -> encode -> eval]. INIT=MODEL_DIR skips the stages before the fresh-people one and
#   evaluates MODEL_DIR first (e.g. INIT=samples/model; PRESET, WARM, S1, SINGLE, LR and S3 are
#   then unused).
# TOP1=0 skips the top-1 evaluations.
# Each eval: 500 questions about unseen people, none / memory (5 retrieved memories) / rag, then
# memory with the top-1 alone; eval.json's right_attention is the asked person's share of the
# answer token's memory attention (0.2 = no preference).
#
#   m3 distill-embedder EMB --idf-corpus SYNTH/kb.parquet --dims 128   # SYNTH: m3 synth --people 2000 --seed 0
#   EMB=… OUT=out/gpu-proof-small bash research/gpu_proof_small.sh
#
# A static embedder stands in for MiniLM (the GPU machine has no network and takes 64 MiB per
# call): in the evaluations the prompt's chunk finds the asked person first for 0.81 of the
# questions and among its 5 memories for 0.98 (MiniLM: 0.96 / 1.00). A stage starts only while
# the elapsed time is under BUDGET seconds (else the script stops with exit status 3). DEVICE=cpu PRESET=tiny WARM=2 S1=4 S3=2 FRESH=50 FRESH_STEPS=2 LIMIT=8 BATCH=2 is a dry
# run on a CPU (1 minute). Recorded run (one H100): bench/results/h100-small-proof.json, README.
set -uo pipefail
: "${EMB:?EMB=static embedder dir}"
OUT=${OUT:-out/gpu-proof-small}
W=${W:-/tmp/m3-proof-small}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-small}
WARM=${WARM:-200}
S1=${S1:-1200}
SINGLE=${SINGLE:-$(( S1 / 2 ))}
S3=${S3:-600}
LR=${LR:-1e-3}
LR3=${LR3:-5e-4}
FRESH=${FRESH:-0}
FRESH_STEPS=${FRESH_STEPS:-2000}
INIT=${INIT:-}
TOP1=${TOP1:-1}
BATCH=${BATCH:-16}
LIMIT=${LIMIT:-500}
BUDGET=${BUDGET:-420}
PY=${PY:-python3}
M3="$PY -m m3cli"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$W"
START=$(date +%s)
el() { echo "[$(( $(date +%s) - START )) s]"; }
over() { [ $(( $(date +%s) - START )) -ge "$BUDGET" ] && { echo "$(el) stopping before $1 (over BUDGET=$BUDGET s)"; return 0; }; return 1; }
rm -f "$OUT"/eval-*.json "$OUT"/eval-*.log "$OUT"/metrics-*.jsonl  # nothing left from an earlier run
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$OUT/device.txt"
common=(--batch-size "$BATCH" --seq-len 256 --align-docs --device "$DEVICE" --force -q --seed 0)
continual=(--stage continual --refs-per-chunk 5 --prev-chunks 0 --embedder "$EMB")

evaluate() {  # model bank tag
  rm -f "$OUT/eval-$3-top1.json"
  $M3 eval --model "$1" --bank "$2" --qa "$W/synth/qa_unseen.jsonl" --limit "$LIMIT" --embedder "$EMB" \
    --device "$DEVICE" --json > "$OUT/eval-$3.json" 2> "$OUT/eval-$3.log" || { echo "eval $3 failed"; tail -5 "$OUT/eval-$3.log"; }
  [ "$TOP1" = 1 ] && $M3 eval --model "$1" --bank "$2" --qa "$W/synth/qa_unseen.jsonl" --limit "$LIMIT" --embedder "$EMB" \
    --device "$DEVICE" --modes memory --memories 1 --json > "$OUT/eval-$3-top1.json" 2>> "$OUT/eval-$3.log"
  $PY - "$OUT/eval-$3.json" "$OUT/eval-$3-top1.json" "$3" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"{sys.argv[3]}: no result ({e})")
try:
    top1 = f"{json.load(open(sys.argv[2]))['memory']['accuracy']:.3f}"
except (OSError, ValueError, KeyError):
    top1 = "-"
m = r["memory"]
print(f"{sys.argv[3]}: none {r['none']['accuracy']:.3f}  memory(5) {m['accuracy']:.3f}  top-1 {top1}"
      f"  rag {r['rag']['accuracy']:.3f}  right retrieved {m.get('right_retrieved')} share {m.get('right_attention')}"
      f" (even {m.get('right_attention_even')})")
PY
}
copy_metrics() { [ -f "$1.train/metrics.jsonl" ] && cp "$1.train/metrics.jsonl" "$OUT/metrics-$2.jsonl"; }
finish() {  # model tag: keep its loss curve, re-encode the proof's knowledge base with it, evaluate
  copy_metrics "$1" "$2"
  $M3 encode "$W/synth/kb.parquet" -o "$W/kb-$2.m3bank" -m "$1" --embedder "$EMB" --device "$DEVICE" --force -q || exit 1
  echo "$(el) evaluate $2"
  evaluate "$1" "$W/kb-$2.m3bank" "$2"
}

echo "$(el) m3 synth: 2000 people, seed 0 (the proof's task)"
$M3 synth "$W/synth" --people 2000 --seed 0 --force > /dev/null || exit 1
if [ -n "$INIT" ]; then  # start from a trained model: straight to the fresh-people stage
  prev=$INIT
  finish "$INIT" init
else
  echo "$(el) warmup: $WARM steps from scratch, preset $PRESET"
  $M3 pretrain "$W/synth/train.parquet" -o "$W/warm" --config "$PRESET" --stage warmup --steps "$WARM" --lr "$LR" \
    "${common[@]}" || exit 1
  copy_metrics "$W/warm" warm
  $M3 encode "$W/synth/kb.parquet" -o "$W/kb-warm.m3bank" -m "$W/warm" --embedder "$EMB" --device "$DEVICE" --force -q || exit 1

  over "continual stage 1" && exit 3
  echo "$(el) continual stage 1: $S1 steps (the first $SINGLE read only each chunk's top-1), memory in every layer, top-16"
  $M3 pretrain "$W/synth/train.parquet" -o "$W/c1" --init-from "$W/warm" --bank "$W/kb-warm.m3bank" --steps "$S1" \
    "${continual[@]}" --single-ref-steps "$SINGLE" --memory-layers all --memory-top-k 16 --lr "$LR" "${common[@]}" || exit 1
  finish "$W/c1" c1

  prev="$W/c1"
  if [ "$S3" -gt 0 ]; then
    over "continual stage 3" && exit 3
    echo "$(el) continual stage 3: $S3 steps, each chunk reading its top-1 and 4 title neighbours (namesakes)"
    $M3 pretrain "$W/synth/train.parquet" -o "$W/c3" --init-from "$W/c1" --bank "$W/kb-c1.m3bank" --steps "$S3" \
      "${continual[@]}" --distractors title --lr "$LR3" "${common[@]}" || exit 1
    finish "$W/c3" c3
    prev="$W/c3"
  fi
fi

if [ "$FRESH" -gt 0 ]; then
  # People the weights have never seen, question-answer text only, each person's facts only in a
  # bank of their own: no answer can be memorised, every one must be read from the right memory.
  over "the fresh-people stage" && exit 3
  echo "$(el) fresh-people stage: $FRESH new people (m3 synth --qa-only --seed 11), $FRESH_STEPS steps, top-1 + 4 title neighbours"
  $M3 synth "$W/fresh" --people "$FRESH" --seed 11 --qa-only --force > /dev/null || exit 1
  $M3 encode "$W/fresh/kb.parquet" -o "$W/kb-fresh-people.m3bank" -m "$prev" --embedder "$EMB" --device "$DEVICE" --force -q || exit 1
  $M3 pretrain "$W/fresh/train.parquet" -o "$W/cf" --init-from "$prev" --bank "$W/kb-fresh-people.m3bank" --steps "$FRESH_STEPS" \
    "${continual[@]}" --distractors title --lr "$LR3" "${common[@]}" || exit 1
  finish "$W/cf" fresh  # on the proof's unseen people
fi
echo "$(el) done"
