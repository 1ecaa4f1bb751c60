#!/usr/bin/env bash
# Issue #6, stop 17's open question: does the name loss hurt the reading, or only need longer?
#
# Two runs side by side on one GPU, each STEPS steps (8 x 256 tokens, as on the CPU) from the
# sample model x8 on the question-answer text of fresh people whose names are the proof's own
# (`python research/fresh_people.py D 6000 11`), each chunk reading its top-1 and 4 title
# neighbours (RET: the retrieval.npy of a 1-step `m3 pretrain … --stage continual
# --refs-per-chunk 5 --distractors title --prev-chunks 0 --align-docs --seed 1`, made with
# MiniLM on the CPU):
#   ctl  no name loss
#   nl   name loss 0.1 after layer 1 on the training text (`--name-loss 0.1 --name-layers 1
#        --name-sides ctx`), the variant that cost the reading least in 300 steps
# The bank here serves only the references' text (training encodes them in real time), so it is
# indexed with a static embedder (EMB). The trained models come back in $OUT/models.tar and are
# evaluated on the CPU with MiniLM (the GPU machine cannot take MiniLM): encode the proof's KB
# with each, then `m3 eval` on 500 unseen-people questions with 5 memories and with the top-1.
#
#   D=.gpu/d RET=.gpu/rd.train/retrieval.npy EMB=.gpu/p4/synth-static OUT=$OUT bash research/gpu_name_loss.sh
#
# STEPS=2 on a CPU is a dry run (1 minute). Recorded: bench/results/h100-name-loss.json, README.
set -uo pipefail
: "${D:?D=fresh people dir}" "${RET:?RET=retrieval.npy}" "${EMB:?EMB=static embedder dir}"
OUT=${OUT:-out/gpu-name-loss}
STEPS=${STEPS:-2000}
PY=${PY:-python3}
W=${W:-/tmp/m3-name-loss}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$W"
START=$(date +%s)
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$OUT/device.txt"
$PY -m m3cli encode "$D/kb.parquet" -o "$W/kb-d.m3bank" -m samples/model --embedder "$EMB" -q --force || exit 1
echo "[$(( $(date +%s) - START )) s] bank encoded"
run() {
  local name=$1; shift
  $PY research/memory_reading.py train -o "$W/$name" --init-from samples/model --corpus "$D/train.parquet" \
    --bank "$W/kb-d.m3bank" --retrievals "$RET" --refs-per-chunk 5 --steps "$STEPS" --seed 1 --force "$@" \
    > "$OUT/$name.log" 2>&1
  echo "[$(( $(date +%s) - START )) s] $name exited $?: $(tail -1 "$OUT/$name.log")"
}
run ctl &
run nl --name-loss 0.1 --name-layers 1 --name-sides ctx &
wait
for name in ctl nl; do
  cp "$W/$name.train/metrics.jsonl" "$W/$name/metrics.jsonl" 2>/dev/null
  cp "$W/$name.names.jsonl" "$W/$name/names.jsonl" 2>/dev/null
done
tar -C "$W" -cf "$OUT/models.tar" ctl nl
ls -la "$OUT"
