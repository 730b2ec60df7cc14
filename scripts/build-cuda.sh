#!/usr/bin/env bash
# Builds memvp with `--features cuda` on any Linux machine, GPU or not: CUDA 13.0's compiler and
# headers from PyPI's NVIDIA wheels (cached in ~/.cache/memvp; what the H200 machines' driver 580
# runs), CUDA_COMPUTE_CAP (default 90: H100/H200; 80 for A100) so that no GPU is probed, the
# binary in target/cuda/release/memvp, and with --dist a stripped, gzipped copy in
# dist/memvp-cuda.gz for a GPU machine without Rust (scripts/gpu-check.sh takes it as it is).
#   scripts/build-cuda.sh [--dist]
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${XDG_CACHE_HOME:-$HOME/.cache}/memvp/cuda-13.0.88
if [ ! -x "$cuda/nvidia/cu13/bin/nvcc" ]; then
  echo "installing CUDA 13.0 compiler and headers into $cuda"
  python3 -m pip install -q --target "$cuda" nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96
fi
export CUDA_HOME=$cuda/nvidia/cu13 CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
PATH=$CUDA_HOME/bin:$PATH cargo build --release --features cuda --target-dir target/cuda
if [ "${1:-}" = --dist ]; then
  mkdir -p dist
  strip -o dist/memvp-cuda target/cuda/release/memvp
  gzip -9 -f dist/memvp-cuda
  ls -l dist/memvp-cuda.gz
fi
