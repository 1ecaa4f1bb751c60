#!/usr/bin/env bash
# The retriever-score prior on a GPU (one H100 in the recorded run): the CUDA tests (bf16 against
# fp32, the prior's float mask included), then 60 continual steps (16 x 256, bf16 mixed precision)
# of the sample model on 300 people with title distractors, its gains training on, then 30
# unseen-people questions with the retriever's scores and without (--no-score-prior).
# EMB: a static embedder dir (the GPU machine cannot take MiniLM), e.g. `m3 distill-embedder EMB
# --idf-corpus out/demo/synth/kb.parquet --dims 128`. DEV=cpu STEPS=2 is a dry run (1 minute).
# Recorded: bench/results/h100-score-prior-check.txt.
#
#   EMB=… bash research/gpu_prior_check.sh
set -uo pipefail
DEV=${DEV:-cuda}; STEPS=${STEPS:-60}; : "${EMB:?EMB=static embedder dir}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
[ "$DEV" = cuda ] && timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_model.py tests/test_generate.py 2>&1 | tail -3
python3 -m m3cli synth /tmp/s --people 300 --seed 0 --force > /dev/null
python3 -m m3cli encode /tmp/s/kb.parquet -o /tmp/kb.m3bank -m samples/model --embedder $EMB -q --force || exit 1
timeout 240 python3 -m m3cli pretrain /tmp/s/train.parquet -o /tmp/p --init-from samples/model --bank /tmp/kb.m3bank \
  --stage continual --refs-per-chunk 5 --prev-chunks 0 --distractors title --steps $STEPS --batch-size 16 --seq-len 256 \
  --align-docs --embedder $EMB --device $DEV -q --log-every 20 --force 2>&1 | tail -3
cat /tmp/p.train/metrics.jsonl
python3 -m m3cli encode /tmp/s/kb.parquet -o /tmp/kb2.m3bank -m /tmp/p --embedder $EMB -q --force || exit 1
for flag in --score-prior --no-score-prior; do
  echo "$flag $(python3 -m m3cli eval --model /tmp/p --bank /tmp/kb2.m3bank --qa /tmp/s/qa_unseen.jsonl --limit 30 \
    --embedder $EMB --device $DEV --modes memory $flag --json)"
done
