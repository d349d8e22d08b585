"""Markdown tables for docs/hybrid.md and docs/prefetch.md from the replay JSON files the GPU
recipes bring back (``simcache replay --out X.json``).

    python recipes/gpu_tables.py hybrid docs/replay-data/hybrid/hybrid-replay-mixtral-8x7b.json
    python recipes/gpu_tables.py prefetch docs/replay-data/prefetch/replay-prefetch-*.json

``hybrid``: per run, measured and predicted ms/token, the error, and the CPU path per expert
(median of the round trip + host FFN, of the host FFN alone, and the calibration's price);
``prefetch``: per run, measured and predicted ms/token, the error, prefetches issued, GB
prefetched, and stall measured beside predicted. The last line of each table counts the runs
whose prediction is within 10 % of the measured time.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np


def rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["results"] if isinstance(data, dict) else data


def _ms(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x * 1e3:.2f}"


def hybrid(records: list[dict]) -> list[str]:
    out = ["| policy | miss | cap | batch | measured ms/tok | predicted ms/tok | error | cpu experts "
           "| cpu ms/expert measured (FFN alone) | cpu ms/expert priced |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        cpu = r.get("cpu_experts", 0)
        measured = (f"{_ms(r.get('cpu_expert_measured_s_median'))} ({_ms(r.get('cpu_expert_ffn_s_median'))})"
                    if cpu else "–")
        out.append(f"| {r['policy']} | {r.get('miss', 'load')} | {r['capacity']} | {r['batch']} "
                   f"| {r['measured_per_token_s'] * 1e3:.2f} | {r['predicted_per_token_s'] * 1e3:.2f} "
                   f"| {r['prediction_error'] * 100:+.1f} % | {cpu} | {measured} "
                   f"| {_ms(r.get('cpu_expert_predicted_s_median')) if cpu else '–'} |")
    return out + [_within(records)]


def prefetch(records: list[dict]) -> list[str]:
    out = ["| policy | prefetch | cap | batch | measured ms/tok | predicted ms/tok | error | prefetches "
           "| GB prefetched | stall ms measured / predicted |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        p = r.get("prefetch", "none")
        shown = p if p == "none" else f"{p} w={r.get('prefetch_width')}"
        pred = r.get("predicted_stall_s")
        out.append(f"| {r['policy']} | {shown} | {r['capacity']} | {r['batch']} "
                   f"| {r['measured_per_token_s'] * 1e3:.2f} | {r['predicted_per_token_s'] * 1e3:.2f} "
                   f"| {r['prediction_error'] * 100:+.1f} % | {r.get('prefetches', 0)} "
                   f"| {r.get('prefetch_bytes', 0) / 1e9:.2f} | {_ms(r['stall_s'])} / {_ms(pred)} |")
    return out + [_within(records)]


def _within(records) -> str:
    ok = sum(abs(r["prediction_error"]) <= 0.10 for r in records)
    worst = max(records, key=lambda r: abs(r["prediction_error"]))
    return (f"\nWithin 10 %: {ok} of {len(records)} runs; the largest error {worst['prediction_error'] * 100:+.1f} % "
            f"({worst['policy']}, {worst.get('miss', 'load')}, capacity {worst['capacity']}, batch {worst['batch']}).")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("hybrid", "prefetch"):
        print("usage: python recipes/gpu_tables.py hybrid|prefetch FILE.json...", file=sys.stderr)
        return 2
    records = [r for p in argv[1:] for r in rows(Path(p))]
    print("\n".join((hybrid if argv[0] == "hybrid" else prefetch)(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
