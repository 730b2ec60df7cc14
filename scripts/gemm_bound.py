#!/usr/bin/env python3
"""The products of memvp's training step through PyTorch's gemm (MKL / oneDNN), shape by shape,
beside memvp's own gemm: is memvp's product path at least as fast as the best gemm on the host,
and how efficient could a step built on either be?

Reads the JSON of `memvp bench --products --json` (the step's products, each with its shape,
operand layouts, count and memvp's best time), times every shape with `torch.mm` on --threads
threads in the same layouts (transposed operands as transposed views, which BLAS reads without a
copy), best of --reps, and prints one JSON line:

- `torch_peak_gflops`: the best of 1024^3 and 2048^3 f32 products through torch, as `memvp
  bench` measures its own peak (`memvp_peak_gflops`);
- `torch_products_ms` / `memvp_products_ms`: the step's products, each at its best time;
- `torch_bound_efficiency` / `memvp_bound_efficiency`: the step's FLOPs over that time, over
  memvp's peak: what a step doing nothing but its products would reach through each gemm;
- `shapes`: per shape, both rates (GFLOP/s over the FLOPs the step counts; a causal product is
  timed whole and charged its causal share, as memvp does).

    memvp bench --lm-shape smollm2-135m --no-baseline --skip-fwd-bwd --products --json > m.json
    python3 scripts/gemm_bound.py m.json --threads 2
"""
import argparse
import json
import time

import torch


def best_ms(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_json", help="output of `memvp bench --products --json`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    bench = json.load(open(a.bench_json))
    if not bench.get("products"):
        raise SystemExit(f"{a.bench_json}: no `products` (run memvp bench with --products --json)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    peak = 0.0
    for n in (1024, 2048):
        x, y = torch.rand(n, n), torch.rand(n, n)
        peak = max(peak, 2 * n**3 / best_ms(lambda: x @ y, 3) / 1e6)
    memvp_peak = bench["matmul_peak_gflops"]
    rows, flop_total, torch_ms, memvp_ms = [], 0.0, 0.0, 0.0
    for s in bench["products"]["shapes"]:
        m, n, k, count = s["m"], s["n"], s["k"], s["count"]
        lhs = torch.rand(k, m).t() if s["lhs_t"] else torch.rand(m, k)
        rhs = torch.rand(n, k).t() if s["rhs_t"] else torch.rand(k, n)
        full = 2.0 * m * n * k
        share = (m + 1) / (2 * m) if s["causal"] else 1.0
        # Small products are timed as runs of up to 50, so that the timer's resolution does not count.
        inner = max(1, min(50, int(2e7 // full)))

        def run(lhs=lhs, rhs=rhs, inner=inner):
            for _ in range(inner):
                torch.mm(lhs, rhs)

        ms = best_ms(run, a.reps) / inner * share
        flop = full * share
        flop_total += flop * count
        torch_ms += ms * count
        memvp_ms += s["ms"] * count
        rows.append(dict(name=s["name"], m=m, n=n, k=k, lhs_t=s["lhs_t"], rhs_t=s["rhs_t"], count=count,
                         torch_gflops=flop / ms / 1e6, memvp_gflops=s["gflops"]))
    print(json.dumps(dict(
        torch=torch.__version__, threads=a.threads, torch_peak_gflops=peak, memvp_peak_gflops=memvp_peak,
        step_gflop=flop_total / 1e9, torch_products_ms=torch_ms, memvp_products_ms=memvp_ms,
        torch_bound_efficiency=flop_total / torch_ms / 1e6 / memvp_peak,
        memvp_bound_efficiency=flop_total / memvp_ms / 1e6 / memvp_peak,
        memvp_step_ms=bench["memvp"]["train_step_ms"], shapes=rows)))


if __name__ == "__main__":
    main()
