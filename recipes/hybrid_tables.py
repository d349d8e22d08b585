"""The simulated tables of docs/hybrid.md: ms/token for --miss load, cpu, auto against capacity.

Two settings on the shipped traces -- Mixtral-8x7B-shaped (traces/trained-mixtral-8e.parquet,
8 experts, top-2, a Mixtral-8x7B bf16 expert of 352 MiB) and DeepSeek-V2-Lite-shaped
(traces/flame-moe-290m.parquet, 64 experts, top-6, a DeepSeek-V2-Lite routed expert of
16.5 MiB; expert bytes from simcache/replay/presets.py) -- on both reference machines (the H200
default and the RTX 4090 calibration). Every policy is scored on the same half of the requests;
static's hot set is counted on the other half (split by request, seed 0). Run from the
repository root:

    python recipes/hybrid_tables.py [--batch 1] [--handoff SECONDS]

``--handoff`` prices the CPU path's hand-off (``cpu_group_s``, once per group with a CPU
expert; docs/metrics.md) on both machines, where the built-in references carry 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simcache  # noqa: E402
from simcache.replay.presets import PRESETS  # noqa: E402
from simcache.timing import REFERENCES  # noqa: E402
from simcache.transitions import split_requests  # noqa: E402

SETTINGS = {
    "Mixtral-8x7B-shaped": ("traces/trained-mixtral-8e.parquet", "mixtral-8x7b", [1, 2, 3, 4, 6]),
    "DeepSeek-V2-Lite-shaped": ("traces/flame-moe-290m.parquet", "deepseek-v2-lite", [4, 8, 16, 32, 48]),
}
POLICIES = ["lru", "static", "belady-bypass"]
MISSES = ["load", "cpu", "auto"]


def rows(setting, machine, batch, handoff=0.0):
    path, preset, caps = SETTINGS[setting]
    train, test = split_requests(simcache.read_trace(ROOT / path), 0.5, 0)
    demand = simcache.demand_counts(train)
    work = simcache.Workload(test, batch)
    cal = dataclasses.replace(REFERENCES[machine](), cpu_group_s=handoff)
    eb = PRESETS[preset].expert_bytes()
    out = []
    for c in caps:
        row = {"capacity": c}
        for p in POLICIES:
            for m in MISSES:
                r = simcache.simulate(work, p, c, miss=m, calibration=cal, expert_bytes=eb, train_demand=demand)
                row[(p, m)] = r
        out.append(row)
    return out, work


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--handoff", type=float, default=0.0, help="cpu_group_s in seconds (default 0)")
    a = ap.parse_args(argv)
    for setting in SETTINGS:
        for machine in REFERENCES:
            table, work = rows(setting, machine, a.batch, a.handoff)
            shown = f", hand-off {a.handoff * 1e3:g} ms" if a.handoff else ""
            print(f"\n{setting}, {machine} calibration{shown}, batch {a.batch} "
                  f"({work.demand.num_accesses:,} accesses, {work.steps.decode_tokens:,} tokens): ms/token")
            head = ["capacity"] + [f"{p} {m}" for p in POLICIES for m in MISSES] + ["best"]
            print("| " + " | ".join(head) + " |")
            print("|" + "---:|" * len(head))
            losses = []
            for row in table:
                cells = {k: v.time_per_token_s * 1e3 for k, v in row.items() if k != "capacity"}
                best = min(cells, key=cells.get)
                print(f"| {row['capacity']} | " + " | ".join(f"{cells[(p, m)]:.2f}" for p in POLICIES for m in MISSES)
                      + f" | {best[0]} {best[1]} |")
                for p in POLICIES:
                    if cells[(p, "auto")] > cells[(p, "load")] * (1 + 1e-9):
                        losses.append(f"{p} at capacity {row['capacity']}: auto {cells[(p, 'auto')]:.2f} > "
                                      f"load {cells[(p, 'load')]:.2f} ms/token (hit ratio "
                                      f"{row[(p, 'auto')].hit_ratio:.3f} vs {row[(p, 'load')].hit_ratio:.3f})")
            print("auto loses to load: " + ("; ".join(losses) if losses else "nowhere"))


if __name__ == "__main__":
    main()
