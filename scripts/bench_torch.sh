#!/usr/bin/env bash
# memvp's MemVP training step against the same step in eager PyTorch (scripts/torch_memvp_step.py),
# side by side in one run: SmolLM2-135M-shaped LLaMA and memvp's random:bench ViT (256 visual
# tokens) with random weights, batch 4 x 64 tokens (8 supervised), f32, the same thread count.
# Alternates the two ROUNDS times (default 3); one JSON per run in OUT (default
# results/bench_torch), and prints the ratio of the medians. Each round also times the step's
# matrix products alone through memvp's gemm (`--products`) and through PyTorch's
# (scripts/gemm_bound.py): the efficiency a step doing nothing else would reach with each.
#   scripts/bench_torch.sh [OUT] [BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/bench_torch}; bin=${2:-target/release/memvp}; rounds=${ROUNDS:-3}
threads=$(nproc)
mkdir -p "$out"
for r in $(seq "$rounds"); do
  "$bin" bench --lm-shape smollm2-135m --no-baseline --warmup 1 --iters 3 --decode-tokens 1 --skip-fwd-bwd \
    --products --json > "$out/memvp-round$r.json"
  python3 scripts/torch_memvp_step.py --warmup 1 --iters 3 --threads "$threads" > "$out/torch-round$r.json"
  python3 scripts/gemm_bound.py "$out/memvp-round$r.json" --threads "$threads" > "$out/gemm-bound-round$r.json"
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
m = [json.load(open(f"{out}/memvp-round{r}.json"))["memvp"]["train_step_ms"] for r in range(1, n + 1)]
t = [json.load(open(f"{out}/torch-round{r}.json"))["train_step_ms"] for r in range(1, n + 1)]
print(f"memvp {statistics.median(m):.0f} ms, PyTorch eager {statistics.median(t):.0f} ms per step: "
      f"{statistics.median(m) / statistics.median(t):.2f}x (rounds: memvp {[round(x) for x in m]}, torch {[round(x) for x in t]})")
g = [json.load(open(f"{out}/gemm-bound-round{r}.json")) for r in range(1, n + 1)]
eff = [json.load(open(f"{out}/memvp-round{r}.json"))["memvp_train_efficiency"] for r in range(1, n + 1)]
print(f"memvp's step at {[round(x, 2) for x in eff]} of its matrix-product peak; its products alone "
      f"{[round(x['memvp_products_ms']) for x in g]} ms ({[round(x['memvp_bound_efficiency'], 2) for x in g]} of the peak) "
      f"through memvp's gemm, {[round(x['torch_products_ms']) for x in g]} ms ({[round(x['torch_bound_efficiency'], 2) for x in g]}) "
      f"through PyTorch's")
PY
