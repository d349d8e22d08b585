"""Time `simcache analyze` on a 1 M-token x 32-layer trace, null models included.

The trace walks the Mixtral-8x7B top-1 transition counts of the write-up's fork (top-2,
8 experts), 1,000 requests of 1,000 tokens, drawn by `simcache.synth`. Target: under 30 s on
one core with 20 null samples.

    python bench/bench_analyze.py [--null 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simcache  # noqa: E402
from simcache.analysis import analyze  # noqa: E402

SEED = ROOT.parent / "shared" / "traces" / "raw" / "seed-transition-matrices" / "mixtral_top1_transition_counts.npy"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--null", type=int, default=20)
    args = ap.parse_args()
    counts = np.load(SEED) if SEED.exists() else None
    kw = {} if counts is not None else dict(num_layers=32, num_experts=8)
    trace = simcache.synth(1000, 1000, top_k=2, transitions=counts, seed=0, weights=False, **kw)
    analyze(simcache.synth(2, 20, num_layers=2, num_experts=8, top_k=2), null_samples=1)  # warm-up
    t0 = time.perf_counter()
    a = analyze(trace, null_samples=args.null, seed=0)
    wall = time.perf_counter() - t0
    o = a.overall()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"trace: {trace.num_tokens:,} tokens x {trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k}")
    print(f"analyze with {args.null} null samples: {wall:.1f} s (target 30 s: {'met' if wall <= 30 else 'MISSED'})")
    print(f"mean top-1 repeat {o['repeat_top1']:.3f} (null {o['repeat_top1_null']['mean']:.3f}), "
          f"1-|lambda2| {o['one_minus_abs_lambda2']:.3f} (null {o['one_minus_abs_lambda2_null']['mean']:.3f})")


if __name__ == "__main__":
    main()
