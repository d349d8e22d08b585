"""Tables for docs/replay.md from the files `recipes/gpu_replay.sh` brings back.

For every replay run it prints what was measured on the GPU beside what the simulator predicts
for exactly the replayed steps and layers, re-predicted with the current timing model from the
calibration measured in the same session (so a change to the model is checked against the same
measurements), and the prediction the run itself printed.

    python recipes/replay_report.py docs/replay-data/run3
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simcache  # noqa: E402
from simcache.workload import Workload  # noqa: E402

RUNS = {
    "mixtral-8x7b": "traces/trained-mixtral-8e.parquet",
    "deepseek-v2-lite": "traces/flame-moe-290m.parquet",
}


def repredict(trace, r, cal, warmup=2):
    work = Workload(trace, r["batch"])
    sim = simcache.simulate(work, r["policy"], r["capacity"], scope=r["scope"], threshold=r["threshold"] or 0.1,
                            expert_bytes=r["expert_bytes"], calibration=cal, record=True)
    L = trace.num_layers
    last = warmup + r["steps"]
    groups = np.array([s * L + l for s in range(warmup, last) for l in r["layers"]])
    return float(sim.decisions.group_time[groups].sum())


def main(prefix: str):
    prefix = Path(prefix)
    for preset, trace_path in RUNS.items():
        cal = simcache.load_calibration(f"{prefix}-calib-h200-{preset}.json")
        trace = simcache.read_trace(ROOT / trace_path)
        probed = dict(zip(cal.copy_bytes, cal.copy_gbps))
        print(f"\n### {preset} on {trace_path} ({cal.device})\n")
        print("| policy | capacity | batch | steps | hits | loads | GB moved | measured ms/token | predicted ms/token | "
              "error | predicted as run | copy GB/s (median) | stall ms | host µs per (step, layer) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in json.loads(Path(f"{prefix}-replay-{preset}.json").read_text()):
            pred = repredict(trace, r, cal)
            tok = r["decode_tokens"]
            err = (pred - r["measured_s"]) / r["measured_s"]
            print(f"| {r['policy']} | {r['capacity']} | {r['batch']} | {r['steps']} | {r['hits']:,} | {r['loads']:,} | "
                  f"{r['bytes_moved'] / 1e9:.1f} | {r['measured_s'] / tok * 1e3:.3f} | {pred / tok * 1e3:.3f} | "
                  f"{err * 100:+.1f}% | {r['predicted_per_token_s'] * 1e3:.3f} | {r['copy_gbps_median']:.1f} | "
                  f"{r['stall_s'] * 1e3:.0f} | {r['host_issue_us_per_group']:.0f} |")
        size = min(probed, key=lambda b: abs(b - r["expert_bytes"]))
        print(f"\nprobed pinned bandwidth at {size / 2**20:g} MiB: {probed[size]:.1f} GB/s")
        for v in ("verify",):
            path = Path(f"{prefix}-{v}-{preset}.json")
            if path.exists():
                (rv,) = json.loads(path.read_text())
                print(f"check against an all-resident run ({rv['policy']}, capacity {rv['capacity']}, batch "
                      f"{rv['batch']}, {rv['steps']} steps): outputs {'bitwise equal' if rv['verified'] else 'DIFFER'}"
                      f" (max abs difference {rv['max_abs_diff']})")


if __name__ == "__main__":
    main(sys.argv[1])
