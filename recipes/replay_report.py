"""Tables for docs/replay.md from the files the GPU recipes bring back.

``recipes/gpu_replay.sh`` (files ``PREFIX-*.json``): for every replay run, what was measured on
the GPU beside what the simulator predicts for exactly the replayed steps and layers,
re-predicted with the current timing model from the calibration measured in the same session
(so a change to the model is checked against the same measurements), and the prediction the
run itself printed.

    python recipes/replay_report.py docs/replay-data/run3

``recipes/gpu_replay_fast.sh`` (a directory): per preset and case, eager beside fast: the
prediction error, host issue time per (step, layer) (median of the first 4 groups, before the
launch queue can fill, and the mean over all, which includes time blocked behind a full
queue), GPU idle time between groups, the copy bandwidth achieved beside the probed one, the outputs checks, and the
fast path's acceptance checks (prediction within 10 % on the fast path, Mixtral within 2 %,
copies at 90 % of the probed bandwidth). ``--check`` exits 1 when a file is missing or an
outputs check failed (a missed accuracy target is a result, printed, not a failure).

    python recipes/replay_report.py docs/replay-data/fast [--check]
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


FAST_PRESETS = ("deepseek-v2-lite", "qwen3-30b-a3b", "olmoe", "mixtral-8x7b")
ISSUES = ("eager", "fast")


def probed_gbps(cal, nbytes):
    """The calibration's pinned bandwidth at ``nbytes`` (its own interpolation)."""
    return nbytes / cal.copy_seconds(nbytes) / 1e9


def fast_report(folder: Path, check: bool) -> int:
    problems, misses = [], []
    for preset in FAST_PRESETS:
        cal_path = folder / f"calib-{preset}.json"
        runs = {i: folder / f"replay-{preset}-{i}.json" for i in ISSUES}
        if not cal_path.exists() and not any(p.exists() for p in runs.values()):
            continue
        for path in [cal_path, *runs.values()]:
            if not path.exists():
                problems.append(f"missing {path.name}")
        if not cal_path.exists() or not all(p.exists() for p in runs.values()):
            continue
        cal = simcache.load_calibration(cal_path)
        rows = {i: json.loads(runs[i].read_text()) for i in ISSUES}
        eb = rows["fast"][0]["expert_bytes"]
        probed = probed_gbps(cal, eb)
        print(f"\n### {preset} on {rows['fast'][0].get('trace', '?')} ({cal.device}), layers "
              f"{rows['fast'][0]['layers'][0]}-{rows['fast'][0]['layers'][-1]}, experts {eb / 2**20:.1f} MiB\n")
        print("| policy | capacity | batch | issue | loads | measured ms/token | predicted ms/token | error | "
              "host µs per (step, layer): first groups / mean | GPU idle µs per (step, layer) | stall ms | "
              "copy GB/s (median) |")
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        key = (lambda r: (r["policy"], r["capacity"], r["batch"]))
        by = {i: {key(r): r for r in rows[i]} for i in ISSUES}
        for k in sorted(by["fast"], key=lambda k: (k[2], k[0], k[1])):
            for i in ISSUES:
                r = by[i].get(k)
                if r is None:
                    problems.append(f"{preset} {i}: no run for {k}")
                    continue
                tok = r["decode_tokens"]
                err = r["prediction_error"]
                print(f"| {r['policy']} | {r['capacity']} | {r['batch']} | {i} | {r['loads']:,} | "
                      f"{r['measured_s'] / tok * 1e3:.3f} | {r['predicted_s'] / tok * 1e3:.3f} | {err * 100:+.1f}% | "
                      f"{np.median(r['group_host_s'][:4]) * 1e6:.0f} / {r['host_issue_us_per_group']:.0f} | "
                      f"{r['idle_s'] / r['groups'] * 1e6:.1f} | {r['stall_s'] * 1e3:.0f} | {r['copy_gbps_median']:.1f} |")
                if i == "fast":
                    goal = 0.02 if preset == "mixtral-8x7b" else 0.10
                    if not abs(err) <= goal:
                        misses.append(f"{preset} {k[0]} capacity {k[1]} batch {k[2]}: error {err * 100:+.1f}% "
                                      f"(target within {goal * 100:.0f}%)")
                if r["loads"] and not r["copy_gbps_median"] >= 0.9 * probed:
                    misses.append(f"{preset} {i} {k}: copies at {r['copy_gbps_median']:.1f} GB/s, under 90% of "
                                  f"the probed {probed:.1f}")
        print(f"\nprobed pinned bandwidth at {eb / 2**20:.1f} MiB: {probed:.1f} GB/s; grouped FFN table: "
              f"{'yes' if cal.group_ffn else 'NO (old calibration: per-expert timing)'}")
        for i in ISSUES:
            path = folder / f"verify-{preset}-{i}.json"
            if not path.exists():
                problems.append(f"missing {path.name}")
                continue
            for rv in json.loads(path.read_text()):
                ok = rv["verified"]
                print(f"check against an all-resident run ({i}, {rv['policy']}, capacity {rv['capacity']}, batch "
                      f"{rv['batch']}, {rv['steps']} steps): outputs {'bitwise equal' if ok else 'DIFFER'} "
                      f"(max abs difference {rv['max_abs_diff']})")
                if not ok:
                    problems.append(f"{preset} {i}: outputs differ from the all-resident run")
    if not problems and not misses and check:
        print("\nall acceptance checks met")
    for m in misses:
        print(f"target missed: {m}")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if check and problems else 0


if __name__ == "__main__":
    target = Path(sys.argv[1])
    if target.is_dir():
        sys.exit(fast_report(target, "--check" in sys.argv[2:]))
    main(sys.argv[1])
