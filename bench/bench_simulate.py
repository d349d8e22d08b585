"""simcache against libCacheSim on the same access stream, in one run.

Two workloads, both drawn from the Mixtral-8x7B top-1 transition counts of the write-up's
fork (32 layers x 8 experts), batch 1:

* ``flat``: top-1 routing, one global pool of 64 slots over the 256 (layer, expert) keys. Every
  step demands one expert per layer, so the access stream is a flat key sequence and both
  simulators run identical semantics: their hit counts must agree exactly (checked here).
* ``moe``: top-2 routing, 4 slots per layer. libCacheSim runs one cache per layer over that
  layer's flattened sequence, one expert at a time. The semantics differ (simcache pins the
  experts a step demands, so a miss cannot evict a hit of the same step; libCacheSim's LRU can
  evict an expert the step needs a moment later), so hit counts differ and only throughput is
  compared; both hit counts are printed.

Throughput is accesses per second of the simulation loop on one core, best of ``--repeat``
runs; simcache's one-off workload build (demand and next-use arrays) is reported separately.
The memory check runs ``simcache simulate`` on a 100 M-access trace in a child process and
reads its peak RSS.

    python bench/bench_simulate.py            # ~3 minutes on the 2-core dev machine
    python bench/bench_simulate.py --quick    # 2 M accesses, no 100 M memory run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simcache  # noqa: E402
from simcache.workload import Workload  # noqa: E402

# the write-up fork's transition counts: $SIMCACHE_SHARED, else the shared folder beside the checkout
SHARED = Path(os.environ.get("SIMCACHE_SHARED", ROOT.parent / "shared"))
SEED_MATRIX = SHARED / "traces" / "raw" / "seed-transition-matrices" / "mixtral_top1_transition_counts.npy"


def mixtral_counts():
    if SEED_MATRIX.exists():
        return np.load(SEED_MATRIX)
    print(f"note: {SEED_MATRIX} missing; using the parametric model instead", file=sys.stderr)
    return None


def machine() -> str:
    """The CPU's model (from /proc/cpuinfo), core count and Python, for a benchmark's first line."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, Python {platform.python_version()}"


def make_trace(accesses, top_k, seed=0):
    counts = mixtral_counts()
    tokens = accesses // (32 * top_k)
    length = 250
    requests = max(1, tokens // length)
    kw = dict(num_layers=32, num_experts=8) if counts is None else {}
    return simcache.synth(requests, length, top_k=top_k, transitions=counts, seed=seed,
                          weights=False, **kw)


def oracle_general(keys, next_use, path):
    """libCacheSim's oracleGeneral binary: uint32 time, uint64 id, uint32 size, int64 next."""
    n = keys.shape[0]
    rec = np.zeros(n, dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    rec["t"] = np.arange(n, dtype=np.uint32)
    rec["id"] = keys.astype(np.uint64) + 1
    rec["size"] = 1
    rec["next"] = np.where(next_use < n, next_use, -1)
    rec.tofile(path)


def lcs_run(cls, path, capacity, repeat):
    import libcachesim as lcs

    best, hits = float("inf"), None
    for _ in range(repeat):
        reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
        cache = cls(cache_size=capacity)
        t0 = time.perf_counter()
        miss_ratio, _ = cache.process_trace(reader)
        best = min(best, time.perf_counter() - t0)
        n = reader.n_total_req
        hits = int(round((1 - miss_ratio) * n))
    return best, hits


FIRST_CALL = {}  # (policy, scope) -> seconds of the first call beyond the best loop: the
# compile (or numba's cache load: run with an empty NUMBA_CACHE_DIR to time the compile) and
# one-off workload arrays


def sc_run(work, policy, capacity, scope, repeat):
    best, result = float("inf"), None
    for n in range(repeat + 1):  # the first run may compile
        start = time.perf_counter()
        r = simcache.simulate(work, policy, capacity, scope=scope)
        if n == 0:
            first = time.perf_counter() - start
        else:
            best = min(best, r.elapsed_s)
        result = r
    FIRST_CALL.setdefault((policy, scope), first - best)
    return best, result


def flat_bench(accesses, repeat, tmp):
    trace = make_trace(accesses, top_k=1)
    t0 = time.perf_counter()
    work = Workload(trace)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    work.future  # Belady's order, built once per trace
    build_nu = time.perf_counter() - t0
    keys = work.demand.keys
    nu = simcache.workload.next_use(keys, 32 * 8)
    n = keys.shape[0]
    path = Path(tmp) / "flat.oracleGeneral"
    oracle_general(keys, nu, path)
    import libcachesim as lcs

    rows = []
    ours = {p: sc_run(work, p, 64, "global", repeat) for p in ("lru", "fifo", "belady", "markov")}
    for policy, cls in (("lru", lcs.LRU), ("fifo", lcs.FIFO), ("belady", lcs.Belady)):
        sc_t, r = ours[policy]
        lc_t, lc_hits = lcs_run(cls, path, 64, repeat)
        rows.append({
            "workload": "flat", "policy": policy, "accesses": n, "simcache_Maps": n / sc_t / 1e6,
            "libcachesim_Maps": n / lc_t / 1e6, "ratio": lc_t / sc_t, "simcache_hits": r.hits,
            "libcachesim_hits": lc_hits, "hits_equal": r.hits == lc_hits,
        })
    sc_t, r = ours["markov"]
    rows.append({"workload": "flat", "policy": "markov", "accesses": n, "simcache_Maps": n / sc_t / 1e6,
                 "simcache_hits": r.hits})
    return rows, {"flat_build_s": build, "flat_future_order_s": build_nu}


def moe_bench(accesses, repeat, tmp):
    trace = make_trace(accesses, top_k=2, seed=1)
    t0 = time.perf_counter()
    work = Workload(trace)
    build = time.perf_counter() - t0
    work.future
    keys = work.demand.keys
    n = keys.shape[0]
    L, E = 32, 8
    layer = keys // E
    paths = []
    for l in range(L):
        sel = np.flatnonzero(layer == l)
        k_l = keys[sel]
        # next use inside the layer's own sequence
        nu_l = simcache.workload.next_use(k_l, L * E)
        p = Path(tmp) / f"moe{l}.oracleGeneral"
        oracle_general(k_l, nu_l, p)
        paths.append(p)
    import libcachesim as lcs

    rows = []
    ours = {p: sc_run(work, p, 4, "layer", repeat) for p in ("lru", "fifo", "belady", "markov", "belady-bypass")}
    for policy, cls in (("lru", lcs.LRU), ("fifo", lcs.FIFO), ("belady", lcs.Belady)):
        sc_t, r = ours[policy]
        lc_t, lc_hits = 0.0, 0
        for p in paths:
            t_, h_ = lcs_run(cls, p, 4, repeat)
            lc_t += t_
            lc_hits += h_
        rows.append({
            "workload": "moe", "policy": policy, "accesses": n, "simcache_Maps": n / sc_t / 1e6,
            "libcachesim_Maps": n / lc_t / 1e6, "ratio": lc_t / sc_t, "simcache_hits": r.hits,
            "libcachesim_hits": lc_hits, "hits_equal": r.hits == lc_hits,
        })
    for policy in ("markov", "belady-bypass"):
        sc_t, r = ours[policy]
        rows.append({"workload": "moe", "policy": policy, "accesses": n, "simcache_Maps": n / sc_t / 1e6,
                     "simcache_hits": r.hits})
    return rows, {"moe_build_s": build}


def memory_run(accesses, tmp):
    """Peak RSS of `simcache simulate` (lru and markov) on a trace of `accesses` accesses."""
    path = Path(tmp) / "big.parquet"
    trace = make_trace(accesses, top_k=2, seed=2)
    simcache.write_trace(trace, path)
    del trace
    out = {}
    for policy in ("lru", "markov"):
        code = (
            "import resource, simcache, time\n"
            f"t = simcache.read_trace({str(path)!r})\n"
            f"r = simcache.simulate(t, {policy!r}, 4)\n"
            "print(r.accesses, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        )
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=ROOT, check=True)
        wall = time.perf_counter() - t0
        n, rss_kb = map(int, done.stdout.split())
        out[policy] = {"accesses": n, "peak_rss_gib": rss_kb / 2**20, "wall_s": wall}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accesses", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 M accesses, skip the 100 M memory run")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = ap.parse_args()
    if args.quick:
        args.accesses = 2_000_000
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        rows, extra = flat_bench(args.accesses, args.repeat, tmp)
        rows2, extra2 = moe_bench(args.accesses, args.repeat, tmp)
        rows += rows2
        extra.update(extra2)
        memory = None if args.quick else memory_run(100_000_000, tmp)
    print(f"machine: {machine()}; one core; best of {args.repeat}")
    print(f"{'workload':9} {'policy':14} {'accesses':>11} {'simcache M/s':>13} {'libCacheSim M/s':>16} "
          f"{'ratio':>6} {'simcache hits':>14} {'libCacheSim hits':>17}")
    for r in rows:
        lc = r.get("libcachesim_Maps")
        lc_text = "-" if lc is None else f"{lc:.1f}"
        ratio = "-" if lc is None else f"{r['ratio']:.2f}x"
        lc_hits = r.get("libcachesim_hits")
        print(f"{r['workload']:9} {r['policy']:14} {r['accesses']:>11,} {r['simcache_Maps']:>13.1f} "
              f"{lc_text:>16} {ratio:>6} {r['simcache_hits']:>14,} "
              f"{'-' if lc_hits is None else f'{lc_hits:,}':>17}")
    print("first call beyond the loop (compile, or numba cache load), seconds: "
          + ", ".join(f"{p} ({sc}) {t:.1f}" for (p, sc), t in FIRST_CALL.items()))
    print("workload build (demand; future order for Belady), once per trace, seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))
    if memory:
        for policy, m in memory.items():
            print(f"100M-access run ({policy}): {m['accesses']:,} accesses, peak RSS {m['peak_rss_gib']:.2f} GiB, "
                  f"wall {m['wall_s']:.1f} s (read + build + simulate)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows, "build": extra, "memory": memory}, indent=2))
    # exact agreement is expected on the flat workload (see docstring)
    failed = [r for r in rows if r["workload"] == "flat" and r.get("hits_equal") is False]
    if failed:
        print("MISMATCH against libCacheSim:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
