#!/usr/bin/env bash
# The memory table of BENCHMARKS.md (issue 11): peak RSS and time of one MemVP training step
# (batch 1, 128 text tokens, M = 320, a ViT-L/14-shaped tower at 224 px with vision adapters)
# for named LM shapes with random weights made directly in each format, with and without
# gradient checkpointing. One JSON per row.
#   scripts/bench_memory.sh OUT_DIR [BINARY]
set -euo pipefail
out=${1:-results/bench_memory}; bin=${2:-target/release/memvp}
mkdir -p "$out"
row() { # shape lm-dtype vision-dtype [--grad-checkpoint]
    local f="$out/$1-$2-vision-$3${4:+-checkpointed}.json"
    [ -s "$f" ] && { echo "have $f"; return; }
    echo "== $1, LM in $2, vision in $3"
    /usr/bin/time -f "%e s wall, %M KB max RSS (whole process, load included)" \
        "$bin" bench --lm-shape "$1" --lm-dtype "$2" --vision random:vit-l14 --vision-dtype "$3" \
        --no-baseline --skip-fwd-bwd --batch-size 1 --text-tokens 128 --answer-tokens 8 \
        --warmup 0 --iters 1 --decode-tokens 1 ${4:-} --json > "$f.tmp"
    mv "$f.tmp" "$f"
}
row smollm2-135m f32 f32
row smollm2-135m bf16 bf16
row smollm2-135m q4_0 bf16
row llama-7b bf16 bf16
row llama-7b q8_0 bf16
row llama-7b q4_0 bf16
row llama-7b q4_0 q8_0
row llama-13b q4_0 bf16
row smollm2-135m bf16 bf16 --grad-checkpoint
row llama-7b bf16 bf16 --grad-checkpoint
row llama-7b q4_0 bf16 --grad-checkpoint
