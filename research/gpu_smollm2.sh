#!/usr/bin/env bash
# Issue #6's GPU item: continual-train the packaged SmolLM2-135M-Instruct to read memories of
# Wikipedia country summaries and country fact sheets, then `m3 eval` capital-city questions in all
# three modes (closed book, memory, RAG), before and after, on held-out countries (no training
# document is about them; their facts are in the bank) and on the training countries.
#
#   python scripts/country_task.py -o DATA --filler 300 --split
#   m3 distill-embedder EMB --idf-corpus DATA/corpus.jsonl --dims 128
#   GGUF=…/SmolLM2-135M-Instruct.Q4_1.gguf DATA=… EMB=… OUT=out/gpu-smollm2 bash research/gpu_smollm2.sh
#
# The static embedder (MiniLM distilled into token vectors, IDF over the knowledge base) stands in
# for MiniLM because the GPU machine cannot download and takes at most 64 MiB per call.
# About 8 minutes on one H100 (README, "Continual training SmolLM2"; bench/results/h100-smollm2-*);
# DEVICE=cpu STEPS=2 BATCH=2 LIMIT=3 is a 3-minute dry run on a CPU. VARIANTS lists the runs: all
# (every weight) and attn (--train memory-attention); a variant starts only while the elapsed time
# is under BUDGET seconds. The recorded run trained without --align-docs (it failed on that
# machine's tokenizer then; see README).
set -uo pipefail
: "${GGUF:?GGUF=path of the SmolLM2 GGUF}" "${DATA:?DATA=country_task.py --split output}" "${EMB:?EMB=static embedder dir}"
OUT=${OUT:-out/gpu-smollm2}
W=${W:-/tmp/m3-smollm2}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
LIMIT=${LIMIT:-0}
VARIANTS=${VARIANTS:-all attn}
BUDGET=${BUDGET:-600}
PY=${PY:-python3}
M3="$PY -m m3cli"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$W"
START=$(date +%s)
el() { echo "[$(( $(date +%s) - START )) s]"; }
lim=(); [ "$LIMIT" -gt 0 ] && lim=(--limit "$LIMIT")
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$OUT/device.txt"

evaluate() {  # model bank tag [eval options]
  for qa in heldout seen; do
    $M3 eval --model "$1" --bank "$2" --qa "$DATA/$qa.jsonl" --embedder "$EMB" --device "$DEVICE" "${lim[@]}" "${@:4}" --json \
      > "$OUT/eval-$3-$qa.json" 2> "$OUT/eval-$3-$qa.log" || { echo "eval $3 $qa failed"; tail -5 "$OUT/eval-$3-$qa.log"; }
    echo "$(el) $3 $qa: $(cat "$OUT/eval-$3-$qa.json" 2>/dev/null | tr -d '\n' | head -c 600)"
  done
}

echo "$(el) convert"
[ -f "$W/smollm2/config.json" ] || $M3 convert "$GGUF" -o "$W/smollm2" || exit 1
echo "$(el) encode the knowledge base with SmolLM2 as converted"
$M3 encode "$DATA/corpus.jsonl" -o "$W/kb-base.m3bank" --model "$W/smollm2" --embedder "$EMB" --device "$DEVICE" \
  --force -q || exit 1
evaluate "$W/smollm2" "$W/kb-base.m3bank" base
evaluate "$W/smollm2" "$W/kb-base.m3bank" base-chat --chat  # its own format, as in `make wiki-demo`

for v in $VARIANTS; do
  if [ $(( $(date +%s) - START )) -ge "$BUDGET" ]; then echo "$(el) skipping variant $v (over BUDGET=$BUDGET s)"; continue; fi
  case $v in
    all)  train=(--train all --lr 1e-4) ;;
    attn) train=(--train memory-attention --lr 3e-4) ;;
    *) echo "unknown variant $v"; continue ;;
  esac
  echo "$(el) continual training, variant $v: ${train[*]}"
  $M3 pretrain "$DATA/train.jsonl" -o "$W/smol-$v" --stage continual --init-from "$W/smollm2" --bank "$W/kb-base.m3bank" \
    --embedder "$EMB" "${train[@]}" --steps "$STEPS" --batch-size "$BATCH" --seq-len 256 --warmup-steps 30 \
    --refs-per-chunk 5 --distractors title --prev-chunks 0 --memory-selection attention_x_value_norm \
    --save-every 100000 --log-every 10 --device "$DEVICE" --force -q > "$OUT/train-$v.log" 2>&1 \
    || { echo "training $v failed"; tail -15 "$OUT/train-$v.log"; continue; }
  tail -3 "$OUT/train-$v.log"
  cp "$W/smol-$v.train/metrics.jsonl" "$OUT/metrics-$v.jsonl" 2>/dev/null
  echo "$(el) re-encode the knowledge base with the trained model"
  $M3 encode "$DATA/corpus.jsonl" -o "$W/kb-$v.m3bank" --model "$W/smol-$v" --embedder "$EMB" --device "$DEVICE" \
    --force -q || continue
  evaluate "$W/smol-$v" "$W/kb-$v.m3bank" "$v"
done
$PY - "$OUT" <<'PY'  # every evaluation and training summary in one file
import glob, json, os, sys
out = sys.argv[1]
summary = {"device": open(os.path.join(out, "device.txt")).read().strip(), "eval": {}, "train": {}}
for f in sorted(glob.glob(os.path.join(out, "eval-*.json"))):
    try:
        summary["eval"][os.path.basename(f)[5:-5]] = json.load(open(f))
    except ValueError:
        pass  # a failed evaluation (its log says why)
for f in sorted(glob.glob(os.path.join(out, "metrics-*.jsonl"))):
    m = [json.loads(line) for line in open(f)]
    if m:
        summary["train"][os.path.basename(f)[8:-6]] = {
            "loss_first_10_steps": m[0]["loss"], "loss_last_10_steps": m[-1]["loss"],
            "median_step_s": sorted(x["step_s"] for x in m)[len(m) // 2], "elapsed_s": m[-1]["elapsed_s"]}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
echo "$(el) done: $OUT/summary.json"
