#!/usr/bin/env bash
# `make proof OUT=DIR`: knowledge that exists only in the bank is used by the model.
#
#   m3 synth -> m3 pretrain (warmup) -> m3 encode (the KB, for the first continual stage's retrieval)
#   -> m3 pretrain (continual 1: every 64-token chunk reads the memory of its top-1 reference,
#   memory in the first half of the layers, 32 tokens kept per layer and KV head) -> m3 encode (the KB, with that model)
#   -> m3 pretrain (continual 2: every chunk reads 5 memories, its top-1 and the 4 references
#   that reference's title retrieves (namesakes, `--distractors title`), memory in all layers,
#   on the training text plus namesake-pair documents (`m3 synth --namesake-pairs`), with
#   `--memory-score-prior`: the model learns how far to trust the retriever's scores when it
#   weighs its memories; not in the paper) -> m3 encode (the KB, with the final model)
#   -> m3 eval on questions about *unseen* people (their facts are only in the bank), then again
#      with --no-score-prior (the same model reading by content alone, as the paper's Eq. 4), with
#      only the top-1 memory, and with --max-score-gap (all reported beside it; the pass/fail
#      check uses the first).
#
# Leaves DIR/model/, DIR/kb.m3bank, DIR/qa_unseen.jsonl, DIR/eval.json, DIR/eval-content.json,
# DIR/eval-top1.json, DIR/eval-gap.json; exits 1 unless memory accuracy >= 0.8 and closed-book
# accuracy <= chance + 0.05 (5 memories, no gap). Training settings: recipes/proof-*.toml (the
# recorded run in docs/training.md); the variables below override them.
set -euo pipefail
OUT=${1:?usage: scripts/proof.sh OUT_DIR}
M3=${M3:-.venv/bin/m3}
PY=${PY:-.venv/bin/python}
PEOPLE=${PEOPLE:-2000}
NAMESAKE_PAIRS=${NAMESAKE_PAIRS:-3600}
QUESTIONS=${QUESTIONS:-500}
GAP=${GAP:-0.03}  # --max-score-gap of the last evaluation (docs/training.md)
SEED=${SEED:-0}  # the task's seed (m3 synth)
# The training settings are the recipes recipes/proof-*.toml (the recorded run); these variables,
# when set, override them: WARMUP_STEPS, CONTINUAL_STEPS (stage 1), CONTINUAL2_STEPS (stage 2),
# LR (stages 0-1), LR2 (stage 2), BATCH, SEQ.
export HF_HUB_OFFLINE=1
start=$(date +%s)
mkdir -p "$OUT"
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
common=(${BATCH:+--batch-size "$BATCH"} ${SEQ:+--seq-len "$SEQ"} --force -q)

step "m3 synth: $PEOPLE invented people, 10% (at most 500) of them unseen"
$M3 synth -o "$OUT/synth" --people "$PEOPLE" --seed "$SEED" --force
cp "$OUT/synth/qa_unseen.jsonl" "$OUT/qa_unseen.jsonl.tmp" && mv "$OUT/qa_unseen.jsonl.tmp" "$OUT/qa_unseen.jsonl"
step "m3 synth --namesake-pairs: the same task plus $NAMESAKE_PAIRS training documents about two namesakes each (stage 2)"
$M3 synth -o "$OUT/synth-pairs" --people "$PEOPLE" --seed "$SEED" --namesake-pairs "$NAMESAKE_PAIRS" --force

step "m3 pretrain --config recipes/proof-warmup.toml: from scratch (preset mini, BPE tokenizer trained on the corpus)"
$M3 pretrain --config recipes/proof-warmup.toml "$OUT/synth/train.parquet" -o "$OUT/warm" \
  ${WARMUP_STEPS:+--steps "$WARMUP_STEPS"} ${LR:+--lr "$LR"} "${common[@]}"

step "m3 encode: the knowledge base with the warmup model (its text and index serve the first continual stage)"
$M3 encode "$OUT/synth/kb.parquet" -o "$OUT/kb-warm.m3bank" -m "$OUT/warm" --force -q

step "m3 pretrain --config recipes/proof-continual1.toml: every 64-token chunk reads the memory of its top-1 reference; memory in the first half of the layers, top-32 tokens"
$M3 pretrain --config recipes/proof-continual1.toml "$OUT/synth/train.parquet" -o "$OUT/continual1" \
  --init-from "$OUT/warm" --bank "$OUT/kb-warm.m3bank" ${CONTINUAL_STEPS:+--steps "$CONTINUAL_STEPS"} ${LR:+--lr "$LR"} \
  "${common[@]}"

step "m3 encode: the knowledge base with the first continual model"
$M3 encode "$OUT/synth/kb.parquet" -o "$OUT/kb-continual1.m3bank" -m "$OUT/continual1" --force -q

step "m3 pretrain --config recipes/proof-continual2.toml: every chunk reading its top-1 and the 4 references its title retrieves (namesakes), namesake pairs added, memory in all layers; the model learns how far to trust the retriever's scores"
$M3 pretrain --config recipes/proof-continual2.toml "$OUT/synth-pairs/train.parquet" -o "$OUT/model" \
  --init-from "$OUT/continual1" --bank "$OUT/kb-continual1.m3bank" ${CONTINUAL2_STEPS:+--steps "$CONTINUAL2_STEPS"} \
  ${LR2:+--lr "$LR2"} "${common[@]}"

step "m3 encode: the knowledge base with the final model"
$M3 encode "$OUT/synth/kb.parquet" -o "$OUT/kb.m3bank" -m "$OUT/model" --force -q

step "m3 eval: $QUESTIONS questions about unseen people, 5 retrieved memories per chunk"
rm -f "$OUT/eval.json"
$M3 eval --model "$OUT/model" --bank "$OUT/kb.m3bank" --qa "$OUT/qa_unseen.jsonl" --limit "$QUESTIONS" --json \
  > "$OUT/eval.json.tmp"
mv "$OUT/eval.json.tmp" "$OUT/eval.json"
rm -f "$OUT/eval-content.json"
step "m3 eval --no-score-prior: the same questions, the model reading its 5 memories by content alone (the paper's Eq. 4)"
$M3 eval --model "$OUT/model" --bank "$OUT/kb.m3bank" --qa "$OUT/qa_unseen.jsonl" --limit "$QUESTIONS" \
  --modes memory --no-score-prior --json > "$OUT/eval-content.json.tmp" \
  && mv "$OUT/eval-content.json.tmp" "$OUT/eval-content.json" || echo "the --no-score-prior evaluation failed (not the check)"
step "m3 eval --memories 1: the same questions, each chunk reading only the retriever's top-1 memory"
rm -f "$OUT/eval-top1.json"
$M3 eval --model "$OUT/model" --bank "$OUT/kb.m3bank" --qa "$OUT/qa_unseen.jsonl" --limit "$QUESTIONS" \
  --modes memory --memories 1 --json > "$OUT/eval-top1.json.tmp" \
  && mv "$OUT/eval-top1.json.tmp" "$OUT/eval-top1.json" || echo "the --memories 1 evaluation failed (not the check)"
step "m3 eval --max-score-gap $GAP: the same questions, each chunk keeping the references within $GAP of its best"
rm -f "$OUT/eval-gap.json"
$M3 eval --model "$OUT/model" --bank "$OUT/kb.m3bank" --qa "$OUT/qa_unseen.jsonl" --limit "$QUESTIONS" \
  --modes memory,rag --max-score-gap "$GAP" --json > "$OUT/eval-gap.json.tmp" \
  && mv "$OUT/eval-gap.json.tmp" "$OUT/eval-gap.json" || echo "the --max-score-gap evaluation failed (not the check)"
step "done in $(( $(date +%s) - start )) s"
$PY - "$OUT/eval.json" "$OUT/eval-gap.json" "$OUT/eval-content.json" "$OUT/eval-top1.json" <<'PY'
import json, os, sys
if os.path.exists(sys.argv[4]):
    t = json.load(open(sys.argv[4]))
    print(f"  with --memories 1 (only the retriever's top-1 memory): memory {t['memory']['accuracy']:.3f}")
if os.path.exists(sys.argv[3]):
    c = json.load(open(sys.argv[3]))
    print(f"  with --no-score-prior (the retriever's scores hidden: the memories told apart by content alone):"
          f" memory {c['memory']['accuracy']:.3f}")
if os.path.exists(sys.argv[2]):
    g = json.load(open(sys.argv[2]))
    print(f"  with --max-score-gap (not the acceptance's setting: most chunks then read the top reference alone):"
          f" memory {g['memory']['accuracy']:.3f}, rag {g['rag']['accuracy']:.3f}")
r = json.load(open(sys.argv[1]))
for mode in ("none", "memory", "rag"):
    print(f"  {mode:6s} accuracy {r[mode]['accuracy']:.3f}  ({r[mode]['correct']}/{r[mode]['n']}, chance {r[mode]['chance']:.3f})")
m = r["memory"]
if m.get("right_attention") is not None:
    print(f"  the asked person's memory: retrieved {m['right_retrieved']:.3f}, first {m['right_first']:.3f}, "
          f"share of memory attention as the answer begins {m['right_attention']:.3f} "
          f"(no preference: {m['right_attention_even']:.3f})")
ok = r["memory"]["accuracy"] >= 0.8 and r["none"]["accuracy"] <= r["none"]["chance"] + 0.05
print("PASS" if ok else "FAIL", "(memory >= 0.8 and none <= chance + 0.05)")
sys.exit(0 if ok else 1)
PY
