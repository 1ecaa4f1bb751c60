#!/usr/bin/env bash
# GPU checks and figures, prepared to finish within 8 minutes on one H100.
#
#   bash bench/gpu.sh            # results under $OUT (default out/gpu)
#
# 1. the CUDA tests (`pytest -m cuda`): model and generation on CUDA match the CPU;
# 2. `m3 bench` on the paper's shape: memory3-2.4b with random weights (bf16) and a synthetic
#    bank of 2,000 random memories, batch 1 and 32, 128 prompt + 128 new tokens, modes
#    none/memory/rag (the paper's Table 21 setup: 1131 tok/s without memory, 733 with, A800), every
#    run with the bank evicted from the page cache (--cold: memories read from the drive);
# 3. `m3 bench` on the small preset with a 10k-reference synthetic bank, batch 1, 8 and 32.
# The self embedder is used (the model's own hidden states) so no second model is needed.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout 120 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_model.py tests/test_generate.py 2>&1 \
  | tail -5 | tee "$OUT/cuda-tests.txt"
timeout 300 $PY -m m3cli bench --model memory3-2.4b --synthetic-refs 2000 --embedder self --device cuda \
  --batch-size 1,32 --prompt-len 128 --max-new-tokens 128 --repeats 2 --cold --json --workdir /tmp/m3-gpu-2.4b \
  > "$OUT/bench-2.4b.json" 2> >(tee "$OUT/bench-2.4b.log" >&2)
timeout 100 $PY -m m3cli bench --model small --synthetic-refs 10000 --embedder self --device cuda \
  --batch-size 1,8,32 --repeats 2 --json --workdir /tmp/m3-gpu-small \
  > "$OUT/bench-small.json" 2> >(tee "$OUT/bench-small.log" >&2)
for f in "$OUT"/bench-*.json; do echo "$f"; cat "$f"; echo; done
