#!/usr/bin/env bash
# The MemVP training step through gemm's AVX2 kernels, its AVX-512 kernels with gemm's own
# threading, and its AVX-512 kernels with memvp's column split, against the same step in eager
# PyTorch, alternated ROUNDS times (default 3) so that the machine's drift hits all alike.
# AVX2_BINARY is a build with gemm's `x86-v4` feature removed from Cargo.toml.
#   scripts/bench_gemm_paths.sh OUT_DIR AVX2_BINARY [BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; avx2=$2; bin=${3:-target/release/memvp}; rounds=${ROUNDS:-3}
mkdir -p "$out"
args=(bench --lm-shape smollm2-135m --no-baseline --warmup 1 --iters 3 --decode-tokens 1 --skip-fwd-bwd --json)
for r in $(seq "$rounds"); do
  "$avx2" "${args[@]}" > "$out/memvp-avx2-round$r.json"
  MEMVP_GEMM_SPLIT=0 "$bin" "${args[@]}" > "$out/memvp-avx512-round$r.json"
  "$bin" "${args[@]}" > "$out/memvp-avx512-split-round$r.json"
  python3 scripts/torch_memvp_step.py --warmup 1 --iters 3 --threads "$(nproc)" > "$out/torch-round$r.json"
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
t = [json.load(open(f"{out}/torch-round{r}.json"))["train_step_ms"] for r in range(1, n + 1)]
for v in ("avx2", "avx512", "avx512-split"):
    d = [json.load(open(f"{out}/memvp-{v}-round{r}.json")) for r in range(1, n + 1)]
    s = [x["memvp"]["train_step_ms"] for x in d]
    print(f"{v:13} step {[round(x) for x in s]} median {statistics.median(s):.0f} ms, "
          f"{statistics.median(s) / statistics.median(t):.2f}x PyTorch; "
          f"matrix-product peak {[round(x['matmul_peak_gflops']) for x in d]} GFLOP/s")
print(f"PyTorch eager {[round(x) for x in t]} median {statistics.median(t):.0f} ms")
PY
