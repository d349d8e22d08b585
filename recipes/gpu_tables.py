"""Markdown tables for docs/hybrid.md and docs/prefetch.md from the replay JSON files the GPU
recipes bring back (``simcache replay --out X.json``).

    python recipes/gpu_tables.py hybrid docs/replay-data/hybrid/hybrid-replay-mixtral-8x7b.json
    python recipes/gpu_tables.py prefetch docs/replay-data/prefetch/replay-prefetch-*.json
    python recipes/gpu_tables.py cpu-groups docs/replay-data/hybrid/run5/hybrid-replay-mixtral-8x7b.json.gz
    python recipes/gpu_tables.py host-diag docs/replay-data/hybrid/run5/diag-*.json

``hybrid``: per run, measured and predicted ms/token, the error, and the CPU path per expert
(median of each expert's share of its group's CPU path -- its host FFN and, where the executor
copies results up (``cpu_upload: copy``, runs before 7), its result upload; the first also the
group's copy down, the last the final wait; of the host FFN alone; and the calibration's price);
``prefetch``: per run, measured and predicted ms/token, the error, prefetches issued, GB
prefetched, and stall measured beside predicted. The last line of each table counts the runs
whose prediction is within 10 % of the measured time. ``cpu-groups``: per hybrid run, where a
group with CPU experts spends its measured time (means over those groups): the worker waiting
for the GPU to gather the tokens, the host FFN, the rest of the executor's path (the copy down;
with ``cpu_upload: copy`` also the uploads, queued behind weight copies), and the rest of the
group (the issuing thread picking the results up, with ``cpu_upload: read`` the kernel that
reads them, and issuing the next group: the group's measured time less the CPU path
and the wait, which is the hand-off only where the CPU path is the longer one), beside the
model's CPU price per group (host FFN and round trips).
``host-diag``: the median and range of each condition of ``recipes/gpu_host_diag.py``'s
windows.
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


def _at_rate(r: dict) -> str:
    """The error with the host FFN priced at the rate the replay ran at (x factor), where the
    replay recorded it; replays of run 9 re-simulated at that rate instead of re-pricing the
    schedule that ran, and record the accesses the other rate moved (n moved)."""
    at = r.get("predicted_at_run_rate_s")
    if at is None or at != at:
        return "–"
    moved = r.get("accesses_reassigned_at_run_rate", 0)
    return (f"{(at - r['measured_s']) / r['measured_s'] * 100:+.1f} % (x{r['cpu_rate_factor']:.2f}"
            f"{f', {moved} moved' if moved else ''})")


def hybrid(records: list[dict]) -> list[str]:
    out = ["| policy | miss | cap | batch | measured ms/tok | predicted ms/tok | error | cpu experts "
           "| cpu ms/expert measured (FFN alone) | cpu ms/expert priced | error at the run's FFN rate |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        cpu = r.get("cpu_experts", 0)
        measured = (f"{_ms(r.get('cpu_expert_measured_s_median'))} ({_ms(r.get('cpu_expert_ffn_s_median'))})"
                    if cpu else "–")
        out.append(f"| {r['policy']} | {r.get('miss', 'load')} | {r['capacity']} | {r['batch']} "
                   f"| {r['measured_per_token_s'] * 1e3:.2f} | {r['predicted_per_token_s'] * 1e3:.2f} "
                   f"| {r['prediction_error'] * 100:+.1f} % | {cpu} | {measured} "
                   f"| {_ms(r.get('cpu_expert_predicted_s_median')) if cpu else '–'} | {_at_rate(r)} |")
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


def cpu_groups(records: list[dict]) -> list[str]:
    out = ["| policy | miss | cap | batch | CPU groups | CPU experts per group | group ms measured "
           "| wait for gather ms | host FFN ms | rest of the executor ms | rest of the group ms "
           "| CPU priced ms (FFN + round trips) | hand-off (wait + both rests) ms |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if not r.get("cpu_experts"):
            continue
        g = np.asarray(r["group_cpu_experts"]) > 0
        measured = np.asarray(r["group_measured_s"])[g]
        path = np.asarray(r["group_cpu_path_s"])[g]
        wait = np.asarray(r["group_cpu_wait_s"])[g]
        n = int(g.sum())
        ffn = float(np.sum(r["cpu_expert_ffn_s"])) / n
        priced = float(np.sum(r["cpu_expert_predicted_s"])) / n
        rest_ex, rest_group = path.mean() - ffn, (measured - path - wait).mean()
        out.append(f"| {r['policy']} | {r['miss']} | {r['capacity']} | {r['batch']} | {n} "
                   f"| {r['cpu_experts'] / n:.2f} | {_ms(measured.mean())} | {_ms(wait.mean())} | {_ms(ffn)} "
                   f"| {_ms(rest_ex)} | {_ms(rest_group)} | {_ms(priced)} | {_ms(wait.mean() + rest_ex + rest_group)} |")
    return out


def host_diag(paths: list[Path]) -> list[str]:
    keys = ("alone_ms", "executor_ms", "busy_one_ms", "busy_rotate_ms", "executor_busy_rotate_ms")
    out = ["| preset | threads | binding | tokens | windows | " + " | ".join(k[:-3].replace("_", " ") for k in keys)
           + " | copy ms (one / rotating) |",
           "|---|---:|---|---:|---:|" + "---:|" * len(keys) + "---:|"]
    for p in paths:
        d = json.loads(p.read_text())
        for t in sorted({r["tokens"] for r in d["rows"]}):
            rs = [r for r in d["rows"] if r["tokens"] == t]
            cell = [f"{np.median([r[k] for r in rs]):.2f} ({min(r[k] for r in rs):.2f}–{max(r[k] for r in rs):.2f})"
                    for k in keys]
            copy = f"{np.median([r['copy_one_ms'] for r in rs]):.2f} / {np.median([r['copy_rotate_ms'] for r in rs]):.2f}"
            bind = d["env"].get("OMP_PROC_BIND") or "none"
            out.append(f"| {d['preset']} | {d['threads']} | {bind} | {t} | {len(rs)} | " + " | ".join(cell) + f" | {copy} |")
    return out


def _within(records) -> str:
    ok = sum(abs(r["prediction_error"]) <= 0.10 for r in records)
    worst = max(records, key=lambda r: abs(r["prediction_error"]))
    line = (f"\nWithin 10 %: {ok} of {len(records)} runs; the largest error {worst['prediction_error'] * 100:+.1f} % "
            f"({worst['policy']}, {worst.get('miss', 'load')}, capacity {worst['capacity']}, batch {worst['batch']}).")
    hybrid = [r for r in records if r.get("miss", "load") != "load"]
    if hybrid:
        line += f" Hybrid runs (cpu, auto): {sum(abs(r['prediction_error']) <= 0.10 for r in hybrid)} of {len(hybrid)}"
        rated = [r for r in hybrid if r.get("predicted_at_run_rate_s") is not None
                 and not np.isnan(r["predicted_at_run_rate_s"])]
        if rated:
            near = sum(abs(r["predicted_at_run_rate_s"] - r["measured_s"]) <= 0.10 * r["measured_s"] for r in rated)
            line += f"; at the run's own host FFN rate {near} of {len(rated)}"
        line += "."
    return line


def main(argv: list[str]) -> int:
    tables = {"hybrid": hybrid, "prefetch": prefetch, "cpu-groups": cpu_groups}
    if len(argv) < 2 or argv[0] not in (*tables, "host-diag"):
        print("usage: python recipes/gpu_tables.py hybrid|prefetch|cpu-groups|host-diag FILE.json...", file=sys.stderr)
        return 2
    if argv[0] == "host-diag":
        print("\n".join(host_diag([Path(p) for p in argv[1:]])))
        return 0
    records = [r for p in argv[1:] for r in rows(Path(p))]
    print("\n".join(tables[argv[0]](records)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
