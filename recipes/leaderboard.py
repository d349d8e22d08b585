"""The leaderboard of docs/findings.md: every preset on every shipped trace, as the fraction
of the LRU → belady-bypass gap in hits that it closes.

For each trace in traces/*.parquet, half the requests (seeded, by request) are the test half
every policy is scored on; a policy that learns (a registry rule with a ``learn`` hook: the
Markov ones) gets its prior from the other half, as ``simcache simulate --split 0.5`` does.
Batch 1 and 16; per-layer pools of ¼, ½ and ¾ of the experts per layer.

    gap closed = (hits − hits[lru]) / (hits[belady-bypass] − hits[lru])

so LRU scores 0, belady-bypass 1, and a rule worse than LRU is negative.

    python recipes/leaderboard.py                       # every trace, every preset
    python recipes/leaderboard.py --batches 1 --traces traces/trained-mixtral-8e.parquet
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simcache  # noqa: E402
from simcache.policies import PRESETS, learner_for, resolve  # noqa: E402
from simcache.transitions import split_requests  # noqa: E402
from simcache.workload import Workload  # noqa: E402

FRACTIONS = ((1, 4), (1, 2), (3, 4))


def learns(preset: str) -> bool:
    return learner_for(*resolve(preset)) != 0


def board(path: Path, batches, seed: int):
    """{(batch, capacity): {preset: hits}} on the test half of the trace at ``path``."""
    trace = simcache.read_trace(path)
    train, test = split_requests(trace, 0.5, seed)
    prior = simcache.fit_prior(train)
    E = trace.num_experts
    out = {}
    for batch in batches:
        work = Workload(test, batch)
        for num, den in FRACTIONS:
            capacity = max(1, E * num // den)
            out[(batch, capacity)] = {
                p: simcache.simulate(work, p, capacity, prior=prior if learns(p) else None).hits
                for p in PRESETS
            }
    return trace, out


def table(name, trace, cells) -> str:
    cols = sorted(cells)
    head = " | ".join(f"b{b} c{c}" for b, c in cols)
    lines = [f"**{name}** ({trace.num_experts} experts × {trace.num_layers} layers, top-{trace.top_k}; "
             "test half; gap = belady-bypass − lru hits: "
             + ", ".join(f"b{b} c{c} {cells[(b, c)]['belady-bypass'] - cells[(b, c)]['lru']:,}" for b, c in cols) + ")",
             "", f"| preset | {head} |", "|---|" + "---:|" * len(cols)]
    best = {}
    for col in cols:
        online = {p: h for p, h in cells[col].items() if not resolve(p)[0].needs_future and not resolve(p)[1].needs_future}
        best[col] = max(online, key=online.get)
    for p in PRESETS:
        vals = []
        for col in cols:
            h = cells[col]
            gap = h["belady-bypass"] - h["lru"]
            f = (h[p] - h["lru"]) / gap if gap else 0.0
            vals.append(f"**{f:+.3f}**" if p == best[col] else f"{f:+.3f}")
        lines.append(f"| `{p}` | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", nargs="*", type=Path, default=sorted((ROOT / "traces").glob("*.parquet")))
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--seed", type=int, default=0, help="of the train / test split")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    for path in args.traces:
        trace, cells = board(path, args.batches, args.seed)
        print(table(path.name, trace, cells))
    print(f"({len(PRESETS)} presets; bold: the best online rule of the column; "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
