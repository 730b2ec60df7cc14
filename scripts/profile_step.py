#!/usr/bin/env python3
"""Where a MemVP training step's time goes, per core: a perf profile of `memvp bench`, its
samples classified, and the stretches where one core waits while the other works.

    scripts/profile_step.py [--out DIR] [--bin target/release/memvp] [--freq 299] [-- BENCH ARGS]

Records `perf record -g --call-graph dwarf` of one bench run (default: the SmolLM2-135M-shaped
step of scripts/bench_torch.sh, 8 timed steps), keeps only the samples taken inside training
steps (the stretches where the thread running `memvp::train` is sampled; the first, warm-up
step is left out), and sorts every sample of every thread into

  gemm kernel, gemm packing  - the matrix products (gemm's micro-kernels; its packing of operands)
  skinny products            - memvp's few-row products (`ops::skinny`)
  waiting                    - a core with nothing to run: rayon looking for work, sched_yield
  zero-fill / page faults    - memset of new buffers, the kernel clearing fresh pages
  memvp kernels              - memvp's element-wise kernels (norms, activations, RoPE, softmax, ...)
  candle                     - candle's own ops and autograd bookkeeping (additions, sums, graph)
  other                      - mostly memvp's kernels on a pool worker whose stack perf could
                               not unwind (no memvp frame above an inlined loop)

and, for every sample where a core was waiting, what the other core was doing at that moment
(the nearest sample of the other thread within 4 ms): the work that ran on one core alone.
Writes DIR/profile.txt and DIR/profile.json (perf.data is deleted: it is ~100 MB).
Needs `perf` (Debian: linux-perf) and a release build with debug info (the default profile).
"""
import argparse
import bisect
import collections
import json
import os
import re
import shutil
import subprocess
import sys

BENCH = ["bench", "--lm-shape", "smollm2-135m", "--no-baseline", "--warmup", "1", "--iters", "8",
         "--decode-tokens", "1", "--skip-fwd-bwd", "--json"]
WAIT = ("schedule", "sched_yield", "syscall", "spin_unlock", "steal", "find_work", "futex", "WorkerThread")
FAULT = ("clear_page", "fault", "folio", "cgroup", "alloc_pages", "get_page", "anonymous", "lruvec", "mas_")
ORDER = ["gemm kernel", "gemm packing", "skinny products", "waiting", "zero-fill / page faults",
         "memvp kernels", "candle", "other"]


def category(frames):
    leaf = frames[0]
    top = " ".join(frames[:6])
    if any("gemm_f32::microkernel" in f for f in frames[:3]):
        return "gemm kernel"
    if "pack_generic" in top or "gemm_common" in top or leaf.startswith("write<[f32;"):
        return "gemm packing"
    if any("ops::skinny" in f for f in frames[:3]):
        return "skinny products"
    if any(w in leaf for w in WAIT) or leaf.startswith("rayon_core") or "crossbeam" in leaf:
        return "waiting"
    if "memset" in leaf or any(f in leaf for f in FAULT):
        return "zero-fill / page faults"
    owner = next((f for f in frames if f.startswith(("memvp::", "candle_core::"))), "")
    if owner.startswith("memvp::") and "keep_warm" not in owner and "gemm_strided" not in owner:
        return "memvp kernels"
    if owner.startswith("candle_core::"):
        return "candle"
    return "other"


def owner(frames):
    """The innermost one or two named memvp/candle functions (what the sample is part of)."""
    names = [re.sub(r"<.*", "", f) for f in frames if f.startswith(("memvp::", "candle_core::"))]
    names = [n for n in names if not any(s in n for s in ("keep_warm", "gemm_strided", "dispatch"))]
    return " < ".join(n[:60] for n in names[:2]) or frames[0][:60]


def read_samples(text):
    samples, cur = [], None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                samples.append(cur)
            cur = None
            continue
        m = re.match(r"\s*(\d+)\s+([\d.]+):", line)
        if m and not line.startswith("\t"):
            cur = (int(m.group(1)), float(m.group(2)), [])
        elif cur is not None:
            parts = line.strip().split(" ", 1)
            if len(parts) == 2:
                cur[2].append(parts[1])
    if cur:
        samples.append(cur)
    return samples


def step_windows(samples):
    train = [s for s in samples if any("memvp::train::" in f for f in s[2])]
    if not train:
        sys.exit("no sample inside a training step: is this a bench of a training step, with debug info?")
    # The thread running the step is the one doing candle's backward; the other worker's stack
    # can also show the step's frames (it spins inside `keep_warm`, called from the step).
    graph = collections.Counter(s[0] for s in train if any("candle_core::backprop" in f for f in s[2]))
    driver = (graph or collections.Counter(s[0] for s in train)).most_common(1)[0][0]
    wins = []
    for t in sorted(s[1] for s in train if s[0] == driver):
        if wins and t - wins[-1][1] < 0.05:
            wins[-1][1] = t
        else:
            wins.append([t, t])
    wins = [w for w in wins if w[1] - w[0] > 0.1]
    return driver, wins[1:] if len(wins) > 1 else wins


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="profile-step")
    ap.add_argument("--bin", default="target/release/memvp")
    ap.add_argument("--freq", type=int, default=299)
    ap.add_argument("bench", nargs="*", help="bench arguments (after --); default: bench_torch.sh's step")
    a = ap.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf not found: install it (Debian: apt-get install linux-perf)")
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"{a.bin}: no memvp binary there (cargo build --release, or pass --bin)")
    os.makedirs(a.out, exist_ok=True)
    data = os.path.join(a.out, "perf.data")
    args = a.bench or BENCH
    if "--json" not in args:
        args = [*args, "--json"]  # the report reads the bench's JSON
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        rec = subprocess.run(["perf", "record", "-q", "-F", str(a.freq), "-g", "--call-graph", "dwarf,16384", "-o",
                              data, a.bin, *args], stdout=f)
    if rec.returncode != 0:
        sys.exit(f"perf record of `{a.bin} {' '.join(args)}` failed (exit {rec.returncode}); if perf says the "
                 "events are not permitted, lower /proc/sys/kernel/perf_event_paranoid or run as root")
    text = subprocess.run(["perf", "script", "-i", data, "-F", "tid,time,ip,sym"], capture_output=True, text=True,
                          check=True).stdout
    os.remove(data)
    samples = read_samples(text)
    driver, wins = step_windows(samples)
    starts = [w[0] for w in wins]

    def in_step(t):
        i = bisect.bisect_right(starts, t) - 1
        return i >= 0 and t <= wins[i][1]

    # (thread, time, frames, category), each sample classified once.
    inside = [(tid, t, fr, category(fr)) for tid, t, fr in samples if in_step(t)]
    n = len(inside)
    threads = collections.defaultdict(list)
    for s in inside:
        threads[s[0]].append(s)
    per_thread = {}
    for tid, ss in threads.items():
        c = collections.Counter(cat for *_, cat in ss)
        per_thread[tid] = {k: c[k] / len(ss) for k in ORDER}
    total = collections.Counter(cat for *_, cat in inside)
    owners = collections.Counter((cat, owner(fr)) for _, _, fr, cat in inside
                                 if cat not in ("gemm kernel", "gemm packing", "waiting"))
    # While one core waits: the other's nearest sample.
    alone, alone_owner, waited = collections.Counter(), collections.Counter(), 0
    tids = sorted(threads)
    for tid in tids:
        others = [t for t in tids if t != tid]
        if not others:
            break
        other = max(others, key=lambda t: len(threads[t]))
        times = [s[1] for s in threads[other]]
        for _, t, _, cat in threads[tid]:
            if cat != "waiting":
                continue
            i = bisect.bisect_left(times, t)
            j = min((j for j in (i - 1, i) if 0 <= j < len(times)), key=lambda j: abs(times[j] - t), default=None)
            if j is None or abs(times[j] - t) > 0.004:
                continue
            waited += 1
            _, _, ofr, ocat = threads[other][j]
            alone[ocat] += 1
            if ocat not in ("gemm kernel", "gemm packing"):
                alone_owner[owner(ofr)] += 1
    bench = json.load(open(os.path.join(a.out, "bench.json")))
    m = bench.get("memvp", {})
    report = {
        "command": [a.bin, *args],
        "machine": bench.get("machine"),
        "train_step_ms": m.get("train_step_ms"),
        "matmul_peak_gflops": bench.get("matmul_peak_gflops"),
        "train_efficiency": bench.get("memvp_train_efficiency"),
        "steps_profiled": len(wins),
        "driver_thread": driver,
        "samples": n,
        "share_of_all_samples": {k: total[k] / n for k in ORDER},
        "share_per_thread": {str(t): v for t, v in per_thread.items()},
        "one_core_waiting_share": waited / n,
        "while_one_core_waits_the_other_is_in": {k: alone[k] / n for k in ORDER if alone[k]},
        "while_one_core_waits_top_work": [[o, c / n] for o, c in alone_owner.most_common(15)],
        "top_non_product_work": [[k, o, c / n] for (k, o), c in owners.most_common(25)],
    }
    json.dump(report, open(os.path.join(a.out, "profile.json"), "w"), indent=1)
    label = {t: f"thread {t}{' (driver)' if t == driver else ''}" for t in tids}
    lines = [f"{report['machine']}: step {report['train_step_ms']:.0f} ms, peak {report['matmul_peak_gflops']:.0f} "
             f"GFLOP/s, step efficiency {report['train_efficiency']:.2f}; {len(wins)} steps, {n} samples "
             f"({len(tids)} threads)", "", "share of all samples (both cores):"]
    lines += [f"  {total[k] / n * 100:6.2f}%  {k}" + "".join(f"   [{label[t]}: {per_thread[t][k] * 100:5.1f}%]"
                                                       for t in tids) for k in ORDER]
    lines += ["", f"one core waiting: {waited / n * 100:.2f}% of all samples; the other core meanwhile:"]
    lines += [f"  {alone[k] / n * 100:6.2f}%  {k}" for k in ORDER if alone[k]]
    lines += ["", "work on one core alone (outside the products), by function:"]
    lines += [f"  {c / n * 100:6.2f}%  {o}" for o, c in alone_owner.most_common(15)]
    lines += ["", "largest non-product work, both cores:"]
    lines += [f"  {c / n * 100:6.2f}%  {k:24s} {o}" for (k, o), c in owners.most_common(25)]
    open(os.path.join(a.out, "profile.txt"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
