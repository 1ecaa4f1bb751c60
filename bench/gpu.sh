#!/usr/bin/env bash
# GPU checks and figures (issue #27 item 2), prepared to finish within 9 minutes on one H100/H200.
#
# Prepare here (the GPU machine has no network and lacks faiss and zstandard; the wheels, ~24 MiB,
# travel in carry):
#   bash bench/gpu_reader.sh wheels       # fills .gpu/whl (git-ignored)
# then on the device, in one call with carry .gpu/whl:
#   bash bench/gpu.sh                     # results under $OUT (default out/gpu)
#
# 1. the CUDA tests (`pytest -m cuda`): model and generation on CUDA match the CPU;
# 2. `m3 bench` on the paper's shape: memory3-2.4b with random weights (bf16) and a synthetic
#    bank of 2,000 random memories, batch 1 and 32, 128 prompt + 128 new tokens, modes
#    none/memory/rag (the paper's Table 21 setup: 1131 tok/s without memory, 733 with, A800), every
#    run with the bank evicted from the page cache (--cold: memories read from the drive);
# 3. `m3 bench` on the small preset with a 10k-reference synthetic bank, batch 1, 8 and 32.
# The self embedder is used (the model's own hidden states) so no second model is needed.
# A dry run on this CPU (the small preset for both, the same steps):
#   DEVICE=cpu BIG=small SMALL=small REFS=200 OUT=out/gpu-sh-dry bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:-out/gpu}
G=${G:-.gpu}
DEVICE=${DEVICE:-cuda}
BIG=${BIG:-memory3-2.4b}
SMALL=${SMALL:-small}
REFS=${REFS:-}   # empty: 2,000 references for BIG, 10,000 for SMALL
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ "$DEVICE" = cpu ]; then
  PY=.venv/bin/python
elif ! $PY -c "import faiss, zstandard" 2>/dev/null; then  # a bare GPU machine: install the carried wheels
  if ! ls "$G"/whl/*.whl > /dev/null 2>&1; then
    echo "faiss/zstandard are missing here and $G/whl holds no wheels: run 'bash bench/gpu_reader.sh wheels' and carry $G/whl"
    exit 1
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$OUT/device.txt"
if [ "$DEVICE" != cpu ]; then
  timeout 120 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_model.py tests/test_generate.py 2>&1 \
    | tail -5 | tee "$OUT/cuda-tests.txt"
fi
timeout 300 $PY -m m3cli bench --model "$BIG" --synthetic-refs "${REFS:-2000}" --embedder self --device "$DEVICE" \
  --batch-size 1,32 --prompt-len 128 --max-new-tokens 128 --repeats 2 --cold --json --workdir /tmp/m3-gpu-big \
  > "$OUT/bench-2.4b.json" 2> >(tee "$OUT/bench-2.4b.log" >&2)
timeout 100 $PY -m m3cli bench --model "$SMALL" --synthetic-refs "${REFS:-10000}" --embedder self --device "$DEVICE" \
  --batch-size 1,8,32 --repeats 2 --json --workdir /tmp/m3-gpu-small \
  > "$OUT/bench-small.json" 2> >(tee "$OUT/bench-small.log" >&2)
for f in "$OUT"/bench-*.json; do echo "$f"; cat "$f"; echo; done
