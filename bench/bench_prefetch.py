"""Simulation throughput with prefetch, and its ratio to no prefetch, in one run.

The ``moe`` workload of bench_simulate.py (Mixtral-8x7B shape: 32 layers x 8 experts, top-2,
drawn from the write-up fork's top-1 transition counts), LRU, 4 slots per layer, batch 1 and 16.
For each predictor the plan is built once (outside the timed loop, as the workload is); the
figure is accesses per second of the simulation loop, best of ``--repeat`` runs.

    python bench/bench_prefetch.py            # ~1 minute on the 2-core dev machine
    python bench/bench_prefetch.py --quick    # 2 M accesses
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import simcache  # noqa: E402
from bench_simulate import machine, make_trace  # noqa: E402
from simcache.prefetch import plan as prefetch_plan  # noqa: E402
from simcache.workload import Workload  # noqa: E402


def best_of(work, repeat, **kw):
    best, result = float("inf"), None
    for _ in range(repeat + 1):  # the first run may compile
        r = simcache.simulate(work, "lru", 4, **kw)
        best = min(best, r.elapsed_s)
        result = r
    return best, result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accesses", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 2_000_000 if args.quick else args.accesses
    trace = make_trace(n, top_k=2, seed=1)
    rows = []
    for batch in (1, 16):
        work = Workload(trace, batch)
        base, r0 = best_of(work, args.repeat)
        rows.append({"batch": batch, "prefetch": "none", "width": 0, "accesses": r0.accesses,
                     "Maps": r0.accesses / base / 1e6, "ratio_to_none": 1.0})
        for predictor in ("oracle", "markov"):
            t0 = time.perf_counter()
            plan = prefetch_plan(work, predictor, 2)
            plan_s = time.perf_counter() - t0
            t, r = best_of(work, args.repeat, prefetch=plan)
            rows.append({"batch": batch, "prefetch": predictor, "width": 2, "accesses": r.accesses,
                         "Maps": r.accesses / t / 1e6, "ratio_to_none": base / t, "plan_s": plan_s,
                         "prefetches": r.prefetches})
    print(f"{'batch':>5} {'prefetch':>8} {'M acc/s':>8} {'vs none':>8} {'plan s':>7}")
    for row in rows:
        print(f"{row['batch']:>5} {row['prefetch']:>8} {row['Maps']:>8.1f} {row['ratio_to_none']:>7.2f}x "
              f"{row.get('plan_s', 0.0):>7.2f}")
    print(json.dumps({"machine": machine(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
