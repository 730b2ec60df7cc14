#!/usr/bin/env bash
# The prepared GPU check of issue 15, for a machine with an NVIDIA GPU and no Rust toolchain:
# runs a prebuilt `--features cuda` binary and writes JSON into OUT.
#   (a) parity: `memvp device-check` — the CUDA path against memvp's CPU kernels on the committed
#       tiny fixtures (logits, gradients into the trained tensors, a 20-step MemVP training's
#       losses, greedy generations), f32 and bf16 frozen weights, each within stated tolerances;
#   (b) `memvp bench --device cuda`, MemVP and the input-space baseline, at the SmolLM2-135M and
#       LLaMA-7B shapes (random bf16 weights, ViT-L/14-shaped tower in bf16, batch 4, 128 text
#       tokens, M = 320);
#   (c) the same MemVP step in PyTorch (scripts/torch_memvp_step.py: bf16 bases, autocast);
#   (d) peak GPU memory of each (nvidia-smi sampled every 50 ms; PyTorch's own counter too).
# Then gpu-check.json sums it up. Build the binary on any machine with `scripts/build-cuda.sh
# --dist` and run, on the GPU machine:  scripts/gpu-check.sh dist/memvp-cuda.gz "$OUT"
# Dry run on a CPU machine: DEVICE=cpu SHAPES=smollm2-135m scripts/gpu-check.sh target/release/memvp /tmp/gc
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-dist/memvp-cuda}; out=${2:-${OUT:-gpu-check-out}}; device=${DEVICE:-cuda}
shapes=${SHAPES:-smollm2-135m llama-7b}; iters=${ITERS:-3}
mkdir -p "$out"
# The device machine takes at most 64 MiB of working tree: the stripped binary travels gzipped.
if [[ "$bin" == *.gz ]]; then
  gunzip -c "$bin" > "$out/memvp" && chmod +x "$out/memvp" && bin=$out/memvp
fi
# cudarc opens libcublas/libcublasLt/libcurand/libnvrtc (CUDA 13) at run time; PyTorch's CUDA
# wheels carry them: put their folders on the loader's path.
libs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib", "nvidia/*/lib64"):
        for d in glob.glob(os.path.join(sp, pat)):
            dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$out/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$bin" --version >> "$out/env.txt" 2>&1

# Samples the GPU's used memory (MiB) while a command runs; writes the peak to $out/$1.peak.
sampled() {
  local name=$1; shift
  local log="$out/$name.mem"
  : > "$log"
  if command -v nvidia-smi >/dev/null && [ "$device" != cpu ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$log" 2>/dev/null &
    local smi=$!
  fi
  local t0=$EPOCHREALTIME
  "$@"
  local rc=$?
  local secs=$(python3 -c "print(round($EPOCHREALTIME - $t0, 2))")
  [ -n "${smi:-}" ] && kill "$smi" 2>/dev/null && wait "$smi" 2>/dev/null
  local base=$(head -1 "$log" 2>/dev/null)
  local peak=$(sort -n "$log" 2>/dev/null | tail -1)
  echo "{\"rc\": $rc, \"seconds\": $secs, \"gpu_used_mb_before\": ${base:-null}, \"gpu_used_mb_peak\": ${peak:-null}}" > "$out/$name.peak"
  return $rc
}

# (a) parity
for dt in f32 bf16; do
  sampled "parity-$dt" "$bin" device-check --device "$device" --lm-dtype "$dt" --json > "$out/parity-$dt.json" 2> "$out/parity-$dt.err"
done
# (b) memvp bench, (c) PyTorch, (d) memory
tdev=$device; [ "$device" = cpu ] || tdev=cuda
for shape in $shapes; do
  sampled "bench-$shape" "$bin" bench --device "$device" --lm-shape "$shape" --lm-dtype bf16 \
    --vision random:vit-l14 --vision-dtype bf16 --batch-size 4 --text-tokens 128 --answer-tokens 8 \
    --warmup 1 --iters "$iters" --decode-tokens 4 --skip-fwd-bwd --json > "$out/bench-$shape.json" 2> "$out/bench-$shape.err"
  sampled "torch-$shape" python3 scripts/torch_memvp_step.py --device "$tdev" --bf16 --lm-shape "$shape" \
    --vision vit-l14 --batch-size 4 --text-tokens 128 --answer-tokens 8 --warmup 1 --iters "$iters" \
    > "$out/torch-$shape.json" 2> "$out/torch-$shape.err"
done
python3 - "$out" $shapes <<'PY'
import json, os, sys
out, shapes = sys.argv[1], sys.argv[2:]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:
        return {"missing": f"{name}: {e}"}
s = {"parity": {dt: {k: load(f"parity-{dt}.json").get(k) for k in ("device", "lm_dtype", "pass", "checks")} for dt in ("f32", "bf16")}}
for shape in shapes:
    b, t = load(f"bench-{shape}.json"), load(f"torch-{shape}.json")
    mb, tb = b.get("memvp") or {}, b.get("input_space") or {}
    row = {
        "memvp_step_ms": mb.get("train_step_ms"), "input_space_step_ms": tb.get("train_step_ms"),
        "torch_step_ms": t.get("train_step_ms"),
        "memvp_gpu_peak_mb": load(f"bench-{shape}.peak").get("gpu_used_mb_peak"),
        "torch_gpu_peak_mb_smi": load(f"torch-{shape}.peak").get("gpu_used_mb_peak"),
        "torch_gpu_peak_allocated_mb": t.get("peak_gpu_mb"),
    }
    try:
        row["memvp_over_torch"] = row["memvp_step_ms"] / row["torch_step_ms"]
        row["input_space_over_memvp"] = row["input_space_step_ms"] / row["memvp_step_ms"]
    except Exception:
        pass
    s[shape] = row
json.dump(s, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
print(json.dumps(s, indent=1)[:6000])
PY
