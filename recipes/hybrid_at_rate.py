"""A hybrid replay's schedule, priced again at the host FFN rate it ran at (docs/hybrid.md, run 9).

Run 9's replays recorded the prediction at the run's rate by simulating again at that rate,
which under ``--miss auto`` can choose another schedule (``accesses_reassigned_at_run_rate``).
This reproduces each run's decisions on this machine (the trace, ``--split``, the calibration
file the run used), checks that they give the recorded prediction, and prices the schedule
that ran at the recorded ``cpu_rate_factor`` (as ``simcache replay`` does now). Run from the
repository root, with the calibration the run used:

    python recipes/hybrid_at_rate.py docs/replay-data/hybrid/run9b/hybrid-replay-mixtral-8x7b.json.gz \\
        docs/replay-data/hybrid/run9b/calib-hybrid-mixtral-8x7b.json --layers 0-3 --steps 30
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simcache  # noqa: E402
from simcache.replay.harness import _groups, at_run_rate, parse_layers  # noqa: E402
from simcache.transitions import demand_counts, split_requests, transition_counts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--layers", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--split", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    opener = gzip.open if a.results.suffix == ".gz" else open
    with opener(a.results, "rt") as f:
        records = json.load(f)
    base = simcache.load_calibration(a.calibration)
    traces = {}
    print("| policy | miss | cap | batch | error | at the run's rate, re-simulated (accesses moved) "
          "| at the run's rate, the schedule that ran |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in records:
        if r.get("miss", "load") == "load":
            continue
        path = ROOT / r["trace"]
        if path not in traces:
            train, test = split_requests(simcache.read_trace(path), a.split, a.seed)
            traces[path] = test, dict(prior=transition_counts(train), train_demand=demand_counts(train), seed=a.seed)
        t, extra = traces[path]
        cal = base.cpu_scaled(r["cpu_refresh_factor"]) if "cpu_refresh_factor" in r else base
        work = simcache.Workload(t, r["batch"])
        sim = simcache.simulate(work, r["policy"], r["capacity"], scope=r["scope"], miss=r["miss"],
                                calibration=cal, expert_bytes=r["expert_bytes"], record=True, **extra)
        L = t.num_layers
        n = min(a.steps, work.steps.num_steps)
        timed = [g for g in _groups(work, parse_layers(a.layers, L), n, L) if g[0] >= 2]
        again = at_run_rate(work, sim.decisions.outcome, timed, cal, 1.0, r["expert_bytes"])
        if not np.isclose(again, r["predicted_s"], rtol=1e-9):
            print(f"{r['policy']} {r['miss']} {r['capacity']} {r['batch']}: decisions not reproduced "
                  f"({again:.6f} s against the recorded {r['predicted_s']:.6f} s)", file=sys.stderr)
            return 1
        m = r["measured_s"]
        fixed = at_run_rate(work, sim.decisions.outcome, timed, cal, r["cpu_rate_factor"], r["expert_bytes"])
        old = r.get("predicted_at_run_rate_s")
        moved = r.get("accesses_reassigned_at_run_rate")
        print(f"| {r['policy']} | {r['miss']} | {r['capacity']} | {r['batch']} | {(r['predicted_s'] - m) / m * 100:+.1f} % "
              f"| {'–' if old is None else f'{(old - m) / m * 100:+.1f} % ({moved})'} "
              f"| {(fixed - m) / m * 100:+.1f} % (x{r['cpu_rate_factor']:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
