"""How far the auto rule of docs/design.md §11 is from the best of every subset, on random small groups.

A group: 1-7 misses with 1-64 tokens each (decode batches up to 64), 0-3 hits, priced by a
reference calibration for a Mixtral-8x7B or a DeepSeek-V2-Lite expert. For each ranking rule it
prints the share of groups where the rule is optimal and the mean and worst excess over the
optimum (2^m subsets). Run from the repository root:

    python bench/bench_hybrid_rule.py [--groups 2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simcache import hybrid  # noqa: E402
from simcache.timing import REFERENCES  # noqa: E402
from tests import naive  # noqa: E402

SHAPES = {"mixtral-8x7b": 3 * 4096 * 14336 * 2, "deepseek-v2-lite": 3 * 2048 * 1408 * 2}
RULES = {"by tokens (reference)": naive.by_tokens, "by CPU time": naive.by_cpu_time}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    print(f"{'machine':8} {'expert':17} {'rule':22} {'optimal':>8} {'mean excess':>12} {'worst':>8}")
    for machine, make in REFERENCES.items():
        cal = make()
        for shape, eb in SHAPES.items():
            gpu, cpu, busy, tc, tb = hybrid.luts(cal, eb, a.max_tokens)
            rng = np.random.default_rng(0)
            cases = []
            for _ in range(a.groups):
                m = int(rng.integers(1, 8))
                toks = rng.integers(1, a.max_tokens + 1, m).tolist()
                hit_s = float(gpu[rng.integers(1, a.max_tokens + 1, rng.integers(0, 4))].sum())
                args = (hit_s, toks, gpu, cpu, busy, tc, tb, cal.overlap)
                cases.append((args, naive.best_subset(*args)))
            for name, rank in RULES.items():
                excess = np.array([naive.group_split(*args, rank=rank)[2][3] / best - 1 for args, best in cases])
                print(f"{machine:8} {shape:17} {name:22} {np.mean(excess <= 1e-12):8.1%} "
                      f"{excess.mean():12.3%} {excess.max():8.2%}")


if __name__ == "__main__":
    main()
