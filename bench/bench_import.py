"""Time `simcache import` on a 10 M-row JSONL file and a 10 M-row SGLang per_token dump.

JSONL: records shaped like the public vLLM Mixtral-8x7B decode trace (dataset, problem_id,
layer, token_idx, experts, gating_probs), 32 layers x top-2 of 8 experts, 10 datasets that each
reuse problem ids 0..99 (a composite key), with 1 % of the records removed (gaps). SGLang: a
torch.save dump of 1,250 decode passes of 250 sequences, 32 layers, top-8 ids padded to 8 of
64 (physical = logical). Each import runs in its own process, from reading to the written
trace; its peak resident memory is read from the kernel (ru_maxrss). Goal: >= 1 M rows/s,
memory bounded by row groups rather than by the file.

    python bench/bench_import.py [--rows 10000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 32

CHILD = r"""
import resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from simcache.importers import import_sources
import simcache
trace, report = import_sources({paths!r}, **{options!r})
simcache.write_trace(trace, {out!r})
wall = time.perf_counter() - t0
print(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, trace.num_rows, int(trace.gap_rows.sum()))
"""


def make_jsonl(path: Path, rows: int, seed=0):
    """``rows`` (token, layer) records before the 1 % drop, written in 10 dataset blocks."""
    rng = np.random.default_rng(seed)
    per_block = rows // 10
    tokens = per_block // LAYERS
    problems = 100
    pid = np.repeat(np.arange(tokens) % problems, LAYERS)
    tok = np.repeat(np.arange(tokens) // problems, LAYERS)
    layer = np.tile(np.arange(LAYERS), tokens)
    a = rng.integers(0, 8, per_block)
    b = (a + 1 + rng.integers(0, 7, per_block)) % 8
    keep = rng.random(per_block) >= 0.01
    lines = [f'{{"dataset": "DATASET", "problem_id": {p}, "layer": {l}, "token_idx": {t}, '
             f'"experts": [{x}, {y}], "gating_probs": [0.62, 0.38]}}\n'
             for p, l, t, x, y, k in zip(pid.tolist(), layer.tolist(), tok.tolist(), a.tolist(), b.tolist(),
                                         keep.tolist()) if k]
    block = "".join(lines).encode()
    with open(path, "wb") as f:
        for d in range(10):
            f.write(block.replace(b"DATASET", f"set{d}".encode()))
    return 10 * len(lines)


def make_dump(path: Path, rows: int, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    batch = 250
    passes = rows // (LAYERS * batch)
    records = []
    for fp in range(passes):
        ids = np.argsort(rng.random((LAYERS, batch, 64)), axis=2)[:, :, :8].astype(np.int32)
        records.append(dict(forward_pass_id=fp, rank=0, gatherer_key="primary",
                            input_ids=list(range(batch)), positions=[fp] * batch, extend_seq_lens=None,
                            forward_mode=2, topk_ids_of_layer=torch.from_numpy(ids), misc_objects=[]))
    phys = torch.arange(64).repeat(LAYERS, 1)
    torch.save({"records": records, "last_physical_to_logical_map": phys}, path)
    return passes * batch * LAYERS


def run_child(paths, out, options):
    code = CHILD.format(root=str(ROOT), paths=[str(p) for p in paths], out=str(out), options=options)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr)
    wall, rss_kib, rows, gaps = res.stdout.split()
    return float(wall), int(rss_kib) / 2**20, int(rows), int(gaps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--keep", type=Path, help="Write the inputs here (default: a temporary folder).")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-import-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    src = folder / "trace.jsonl"
    t0 = time.perf_counter()
    records = make_jsonl(src, args.rows)
    print(f"jsonl: {records:,} records, {src.stat().st_size / 2**30:.2f} GiB (made in {time.perf_counter() - t0:.0f} s)")
    wall, gib, rows, gaps = run_child([src], folder / "jsonl.parquet", dict(
        request="dataset,problem_id", position="token_idx", layer="layer", experts="experts",
        weights="gating_probs"))
    print(f"jsonl import: {records / wall / 1e6:.2f} M records/s ({wall:.1f} s), peak RSS {gib:.2f} GiB; "
          f"trace {rows:,} rows, {gaps:,} gaps")
    src.unlink()
    dump = folder / "expert_distribution_recorder_0.0_0.pt"
    t0 = time.perf_counter()
    records = make_dump(dump, args.rows)
    print(f"sglang: {records:,} (token, layer) records, {dump.stat().st_size / 2**30:.2f} GiB "
          f"(made in {time.perf_counter() - t0:.0f} s)")
    wall, gib, rows, gaps = run_child([dump], folder / "sglang.parquet", {})
    print(f"sglang import: {records / wall / 1e6:.2f} M records/s ({wall:.1f} s), peak RSS {gib:.2f} GiB; "
          f"trace {rows:,} rows")
    dump.unlink()


if __name__ == "__main__":
    main()
