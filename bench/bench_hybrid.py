"""Simulation throughput with hybrid execution (--miss cpu|auto) against LRU --miss load, in one run.

The workload of bench_simulate.py's ``moe`` case: drawn from the Mixtral-8x7B top-1 transition
counts of the write-up's fork (32 layers x 8 experts), top-2, 4 slots per layer, batch 1 and
16, a Mixtral-8x7B bf16 expert priced by the default (H200) calibration. Accesses per second
of the simulation loop on one core, best of ``--repeat`` runs after a compiling run.

    python bench/bench_hybrid.py              # 10 M accesses, ~1-2 minutes on the 2-core dev VM
    python bench/bench_hybrid.py --accesses 2000000 --repeat 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numba  # noqa: E402

import simcache  # noqa: E402
from bench_simulate import machine, make_trace  # noqa: E402
from simcache.timing import MIXTRAL_EXPERT_BYTES  # noqa: E402

CASES = [("lru", "load"), ("lru", "cpu"), ("lru", "auto"), ("lru", "auto-cputime"), ("static", "auto"),
         ("belady-bypass", "auto")]


def best_rate(work, policy, miss, repeat, demand):
    best = float("inf")
    for _ in range(repeat + 1):  # the first run may compile
        r = simcache.simulate(work, policy, 4, miss=miss, expert_bytes=MIXTRAL_EXPERT_BYTES, train_demand=demand)
        best = min(best, r.elapsed_s)
    return r.accesses / best / 1e6, r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--accesses", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"machine: {machine()}, numba {numba.__version__}")
    train = make_trace(200_000, top_k=2, seed=2)
    demand = simcache.demand_counts(train)
    trace = make_trace(a.accesses, top_k=2, seed=1)
    for batch in (1, 16):
        work = simcache.Workload(trace, batch)
        base, _ = best_rate(work, "lru", "load", a.repeat, demand)
        print(f"\nbatch {batch}: {work.demand.num_accesses:,} accesses, 4 slots per layer")
        print("| policy | --miss | M accesses/s | ratio to lru --miss load | cpu experts | ms/token |")
        print("|---|---|---:|---:|---:|---:|")
        for policy, miss in CASES:
            rate, r = (base, None) if (policy, miss) == ("lru", "load") else best_rate(work, policy, miss, a.repeat, demand)
            if r is None:
                _, r = best_rate(work, policy, miss, 0, demand)
            print(f"| {policy} | {miss} | {rate:.1f} | {rate / base:.2f} | {r.cpu_experts:,} | "
                  f"{r.time_per_token_s * 1e3:.2f} |")


if __name__ == "__main__":
    main()
