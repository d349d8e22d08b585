"""End-to-end speed: simulate() from an in-memory Trace, the one-pass LRU curve, a sweep.

Three measurements, printed in one run (figures and machine in docs/performance.md):

1. ``simcache.simulate(trace, "lru", ...)`` end to end from an in-memory Trace (workload
   build included) against libCacheSim's LRU on the same key sequence, in the same process:
   the 10 M-access, 256-expert, top-1 Zipf(1) trace (one layer, capacity 64; the two
   simulators' semantics coincide, hit counts must agree) and bench_simulate.py's moe
   workload (32 layers x 8 experts, top-2, 4 slots per layer; libCacheSim runs one cache
   per layer, so only speed is compared). On the Zipf trace also a bare LRU list in numba (no
   groups, pins, counters or times): the floor for any simulate() of it on the machine.
2. The one-pass LRU curve for every capacity 1..E on a 100 M-access, 64-expert, top-6
   trace, against separate ``simulate`` runs (timed at a spread of capacities, the mean
   scaled to all E: 64 full runs would take minutes here): ``lru_curve`` from the Workload
   (its stack and direct passes apart) and from the Trace, and ``lru_results`` (every counter
   and time at every capacity, as the sweep's LRU cells get them); then the stack pass alone
   on the workloads of part 1, per layer and global.
3. A 1,000-cell sweep on 1 and 2 local Dask workers: cells/s once the cluster is up, and
   each worker's peak RSS.

    python bench/bench_sweep.py            # a few minutes on the 2-core dev machine
    python bench/bench_sweep.py --quick    # small sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import simcache  # noqa: E402
from simcache.mrc import lru_curve, lru_results, stack_distances  # noqa: E402
from simcache.workload import Workload, demand, next_use, schedule  # noqa: E402


def zipf_trace(accesses, experts=256, seed=0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1)
    p /= p.sum()
    ex = rng.choice(experts, size=accesses, p=p).astype(np.int16)[:, None]
    n = accesses
    return simcache.Trace.from_arrays(ex, request=np.zeros(n, np.int32), position=np.arange(n, dtype=np.int32),
                                      layer=np.zeros(n, np.int16), num_experts=experts, expert_bytes=1 << 20)


def best(fn, repeat):
    out, t = None, float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        took = time.perf_counter() - t0
        if took < t:  # the result of the best run (its kernel time goes with its total)
            out, t = value, took
    return t, out


def lcs_lru(keys, capacity, repeat, tmp, name):
    """libCacheSim LRU over one key sequence (oracleGeneral file, as bench_simulate.py)."""
    import libcachesim as lcs
    from bench_simulate import oracle_general

    path = Path(tmp) / f"{name}.oracleGeneral"
    oracle_general(keys, next_use(keys, int(keys.max()) + 1), path)
    t, hits = float("inf"), None
    for _ in range(repeat):
        reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
        cache = lcs.LRU(cache_size=capacity)
        t0 = time.perf_counter()
        miss_ratio, _ = cache.process_trace(reader)
        t = min(t, time.perf_counter() - t0)
        hits = int(round((1 - miss_ratio) * reader.n_total_req))
    return t, hits


def _bare_lru():
    """A bare LRU list over one key sequence in numba: no (step, layer) groups, pins, counters,
    times or policy hooks -- the floor for any simulate() of this trace on this machine."""
    from numba import njit

    @njit(cache=False)
    def run(keys, num_keys, capacity):
        prev = np.full(num_keys, -1, np.int32)
        nxt = np.full(num_keys, -1, np.int32)
        inside = np.zeros(num_keys, np.bool_)
        head = tail = -1
        used = hits = 0
        for i in range(keys.size):
            k = keys[i]
            if inside[k]:
                hits += 1
                if tail != k:  # unlink, append at the tail
                    p, n = prev[k], nxt[k]
                    if p >= 0:
                        nxt[p] = n
                    else:
                        head = n
                    prev[n] = p
                    prev[k], nxt[k], nxt[tail], tail = tail, -1, k, k
                continue
            if used == capacity:  # evict the head
                v = head
                head = nxt[v]
                prev[head] = -1
                inside[v] = False
            else:
                used += 1
            inside[k] = True
            prev[k], nxt[k] = tail, -1
            if tail >= 0:
                nxt[tail] = k
            else:
                head = k
            tail = k
        return hits

    return run


def end_to_end(trace, capacity, scope, repeat, tmp, name, per_layer_keys):
    simcache.simulate(trace, "lru", capacity, scope=scope)  # compile / warm
    t_e2e, r = best(lambda: simcache.simulate(trace, "lru", capacity, scope=scope), repeat)
    t_sched, steps = best(lambda: schedule(trace), repeat)
    t_dem, d = best(lambda: demand(trace, steps), repeat)
    work = Workload(trace)
    t_fut, _ = best(lambda: simcache.workload.future_order(work.demand), 2)  # (the first compiles)
    n = r.accesses
    keys = d.keys
    if per_layer_keys:  # one libCacheSim cache per layer, as bench_simulate.py
        E = trace.num_experts
        lc_t, lc_hits = 0.0, 0
        for l in range(trace.num_layers):
            t_, h_ = lcs_lru(keys[keys // E == l], capacity, repeat, tmp, f"{name}{l}")
            lc_t += t_
            lc_hits += h_
        bare_t = bare_hits = None
    else:
        lc_t, lc_hits = lcs_lru(keys, capacity, repeat, tmp, name)
        bare = _bare_lru()
        bare(keys[:1000], trace.num_experts, capacity)  # compile
        bare_t, bare_hits = best(lambda: bare(keys, trace.num_experts, capacity), repeat)
    return {"workload": name, "accesses": n, "simulate_s": t_e2e, "kernel_s": r.elapsed_s,
            "bare_lru_s": bare_t, "bare_lru_hits": bare_hits,
            "schedule_s": t_sched, "demand_s": t_dem, "future_order_s": t_fut,
            "simcache_Maps": n / t_e2e / 1e6, "libcachesim_Maps": n / lc_t / 1e6, "ratio": lc_t / t_e2e,
            "simcache_hits": r.hits, "libcachesim_hits": lc_hits}


def curve_bench(accesses, spread, layers=4):
    E, k = 64, 6
    tokens = accesses // (layers * k)
    t0 = time.perf_counter()
    trace = simcache.synth(max(1, tokens // 1000), 1000, num_layers=layers, num_experts=E, top_k=k,
                           weights=False, seed=3)
    gen = time.perf_counter() - t0
    work = Workload(trace)
    n = work.demand.num_accesses
    simcache.simulate(work, "lru", 8)  # warm
    small = simcache.synth(2, 8, num_layers=2, num_experts=8, top_k=3, seed=1)
    lru_curve(small), lru_results(small, range(1, 9))  # warm (compiled or cached)
    t0 = time.perf_counter()
    curve = lru_curve(work)
    one_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    from_trace = lru_curve(trace)  # the workload build included
    trace_s = time.perf_counter() - t0
    assert (from_trace.hits == curve.hits).all()
    t0 = time.perf_counter()
    full = lru_results(work, range(1, E + 1))  # every counter and time, as the sweep's LRU cells
    results_s = time.perf_counter() - t0
    caps = sorted(set(np.linspace(1, E, spread).round().astype(int).tolist()))
    runs = []
    for c in caps:
        t0 = time.perf_counter()
        r = simcache.simulate(work, "lru", int(c))
        runs.append(time.perf_counter() - t0)
        assert r.hits == int(curve.hits[c - 1].sum()) == full[c - 1].hits, c
    separate = float(np.mean(runs)) * E
    return {"accesses": n, "layers": layers, "experts": E, "top_k": k, "trace_gen_s": gen,
            "one_pass_s": one_pass, "stack_s": curve.stack_s, "direct_s": curve.direct_s,
            "smallest_stack_capacity": curve.smallest_stack, "direct_capacities": curve.smallest_stack - 1,
            "from_trace_s": trace_s, "results_s": results_s, "separate_capacities_timed": caps,
            "separate_mean_s": float(np.mean(runs)), "separate_all_s_est": separate,
            "speedup": separate / one_pass, "capacity_accesses_per_s": E * n / one_pass,
            "from_trace_speedup": separate / trace_s, "results_speedup": separate / results_s}


def stack_bench(traces):
    """The stack pass alone (``stack_distances``, best of 2) on the simulate benchmark's
    workloads: bitsets for pools up to 64 keys, the Fenwick tree above."""
    out = {}
    for name, trace in traces.items():
        work = Workload(trace)
        for scope in ("layer", "global"):
            pool = trace.num_experts * (1 if scope == "layer" else trace.num_layers)
            s = min((stack_distances(work, scope) for _ in range(2)), key=lambda s: s.elapsed_s)
            out[f"{name} {trace.num_layers}x{trace.num_experts} {scope}"] = {
                "accesses": work.demand.num_accesses, "pool": pool, "s": s.elapsed_s,
                "kernel": "bitsets" if pool <= 64 else "Fenwick tree"}
    return out


def _warm(trace_path, policies, scopes):
    trace = simcache.read_trace(trace_path)
    for p in policies:
        for sc in scopes:
            simcache.simulate(trace, p, 2, scope=sc)


def sweep_bench(trace_path, cells_target):
    """1,000 cells: batch 1..20 (20 groups) x 5 policies (none of them LRU, which the one-pass
    curve would make nearly free) x capacities 1..5 x 2 scopes."""
    from distributed import Client, LocalCluster

    def peak_rss_kib():  # VmHWM: this process's own peak (ru_maxrss survives exec from a big parent)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    grid = dict(policy="fifo,lfu,belady,belady-bypass,markov", capacity="1,2,3,4,5", scope="layer,global",
                batch=",".join(str(b) for b in range(1, 21)))
    n_cells = 5 * 5 * 2 * 20
    if cells_target < n_cells:
        grid["batch"] = "1,2"
        n_cells = 5 * 5 * 2 * 2
    out = {}
    for workers in (1, 2):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        try:
            with Client(cluster) as client:
                client.run(lambda: __import__("simcache").simulate)  # import on every worker
                # untimed: one cell per policy and scope on every worker first, so that no
                # worker's first numba compile (or cache load) lands in the timed sweep
                client.run(_warm, trace_path, grid["policy"].split(","), grid["scope"].split(","))
                t0 = time.perf_counter()
                frame = simcache.sweep([trace_path], scheduler=cluster.scheduler_address, **grid)
                wall = time.perf_counter() - t0
                rss = client.run(peak_rss_kib)
        finally:
            cluster.close()
        out[workers] = {"cells": len(frame), "wall_s": wall, "cells_per_s": len(frame) / wall,
                        "worker_peak_rss_mib": sorted(v / 1024 for v in rss.values())}
    out["speedup_2_over_1"] = out[2]["cells_per_s"] / out[1]["cells_per_s"]
    return out, n_cells


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", choices=["simulate", "curve", "sweep"], help="Run one of the three parts.")
    args = ap.parse_args()
    zipf_n = 1_000_000 if args.quick else 10_000_000
    moe_n = 1_000_000 if args.quick else 10_000_000
    curve_n = 2_000_000 if args.quick else 100_000_000
    import bench_simulate
    from bench_simulate import make_trace

    shared = Path(os.environ.get("SIMCACHE_SHARED", ROOT.parent / "shared"))
    bench_simulate.SEED_MATRIX = shared / "traces" / "raw" / "seed-transition-matrices" / bench_simulate.SEED_MATRIX.name

    results = {}
    if args.only in (None, "simulate"):
        with tempfile.TemporaryDirectory() as tmp:
            results["zipf"] = end_to_end(zipf_trace(zipf_n), 64, "layer", args.repeat, tmp, "zipf", False)
            results["moe"] = end_to_end(make_trace(moe_n, top_k=2, seed=1), 4, "layer", args.repeat, tmp, "moe", True)
    if args.only in (None, "curve"):
        results["curve"] = curve_bench(curve_n, 4 if args.quick else 8)
        results["stack"] = stack_bench({"zipf": zipf_trace(zipf_n), "moe": make_trace(moe_n, top_k=2, seed=1)})
    if args.only in (None, "sweep"):
        results["sweep"], _ = sweep_bench(ROOT / "traces" / "trained-mixtral-8e.parquet", 100 if args.quick else 1000)
    machine = bench_simulate.machine()
    print(f"machine: {machine}")
    if "zipf" in results:
        print("simulate(trace, 'lru', ...) end to end from an in-memory Trace (best of %d):" % args.repeat)
    for name in [n for n in ("zipf", "moe") if n in results]:
        r = results[name]
        print(f"  {name:5} {r['accesses']:>11,} accesses: {r['simcache_Maps']:6.1f} M/s end to end "
              f"({r['simulate_s']:.3f} s: kernel {r['kernel_s']:.3f}, schedule {r['schedule_s']:.3f}, "
              f"demand {r['demand_s']:.3f}); libCacheSim LRU {r['libcachesim_Maps']:.1f} M/s; "
              f"ratio {r['ratio']:.2f}x; hits {r['simcache_hits']:,} vs {r['libcachesim_hits']:,}; "
              f"future order (Belady only) {r['future_order_s']:.3f} s")
        if r["bare_lru_s"]:
            build = r["schedule_s"] + r["demand_s"]
            print(f"        bare LRU list, no groups, counters or times: {r['accesses'] / r['bare_lru_s'] / 1e6:.1f} M/s "
                  f"(hits {r['bare_lru_hits']:,}); with the workload build: "
                  f"{r['accesses'] / (r['bare_lru_s'] + build) / 1e6:.1f} M/s end to end at best")
    c = results.get("curve")
    if c:
        print(f"one-pass LRU curve, capacities 1..{c['experts']}, {c['accesses']:,} accesses "
              f"({c['layers']} layers x {c['experts']} experts, top-{c['top_k']}): {c['one_pass_s']:.2f} s "
              f"(stack pass for c >= {c['smallest_stack_capacity']}: {c['stack_s']:.2f} s; one direct pass for "
              f"the {c['direct_capacities']} below: {c['direct_s']:.2f} s); separate runs {c['separate_mean_s']:.2f} s "
              f"each -> {c['separate_all_s_est']:.1f} s for all; speedup {c['speedup']:.1f}x; "
              f"{c['capacity_accesses_per_s'] / 1e9:.2f} G capacity-accesses/s")
        print(f"  from the Trace (workload build included): {c['from_trace_s']:.2f} s, {c['from_trace_speedup']:.1f}x; "
              f"lru_results at 1..{c['experts']} (every counter and time): {c['results_s']:.2f} s, "
              f"{c['results_speedup']:.1f}x")
    for name, r in results.get("stack", {}).items():
        print(f"  stack pass alone, {name} ({r['pool']}-key pools, {r['kernel']}): {r['s']:.3f} s for "
              f"{r['accesses']:,} accesses, {r['accesses'] / r['s'] / 1e6:.0f} M/s")
    s = results.get("sweep")
    for w in (1, 2) if s else ():
        print(f"sweep of {s[w]['cells']:,} cells on {w} local worker(s): {s[w]['wall_s']:.1f} s, "
              f"{s[w]['cells_per_s']:.1f} cells/s; worker peak RSS {', '.join(f'{m:.0f}' for m in s[w]['worker_peak_rss_mib'])} MiB")
    if s:
        print(f"2 workers / 1 worker: {s['speedup_2_over_1']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, **{k: v for k, v in results.items()}}, indent=2,
                                        default=str))


if __name__ == "__main__":
    main()
