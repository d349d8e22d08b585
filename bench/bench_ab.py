"""Two or more checkouts of simcache on the same workloads, interleaved in one run (A/B).

On a shared, noisy machine absolute figures drift between runs by more than the differences
worth finding; this alternates the checkouts (one worker process per checkout, each with its
own numba cache), keeps the best of ``--rounds`` loop runs of each, and prints each checkout's
throughput as a ratio to the first one and, with ``--lcs``, to libCacheSim timed between them.
Workloads are bench_simulate.py's ``flat`` (top-1, 64 global slots) and ``moe`` (top-2, 4 slots
per layer), drawn from the fork's Mixtral transition counts (``$SIMCACHE_SHARED``).

    git worktree add ../base <commit>
    python bench/bench_ab.py ../base . --cases flat:lru,flat:belady,moe:lru --rounds 7 --lcs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LCS = {"lru": "LRU", "fifo": "FIFO", "belady": "Belady"}


def worker(tree: str, accesses: int) -> None:
    """Build both workloads with ``tree``'s simcache; answer 'workload policy' lines with
    'elapsed hits accesses', and 'workload keys PATH' by saving the access keys."""
    sys.path.insert(0, tree)
    import numpy as np

    import simcache

    counts = np.load(Path(os.environ.get("SIMCACHE_SHARED", ROOT.parent / "shared")) / "traces" / "raw"
                     / "seed-transition-matrices" / "mixtral_top1_transition_counts.npy")

    def work(top_k, seed):
        tokens = accesses // (32 * top_k)
        trace = simcache.synth(max(1, tokens // 250), 250, top_k=top_k, transitions=counts, seed=seed,
                               weights=False)
        w = simcache.Workload(trace)
        w.future
        return w

    works = {"flat": (work(1, 0), 64, "global"), "moe": (work(2, 1), 4, "layer")}
    print("ready", flush=True)
    for line in sys.stdin:
        name, policy, *rest = line.split()
        w, capacity, scope = works[name]
        if policy == "keys":
            np.save(rest[0], w.demand.keys)
            print("0 0 0", flush=True)
            continue
        r = simcache.simulate(w, policy, capacity, scope=scope)
        print(r.elapsed_s, r.hits, r.accesses, flush=True)


def lcs_files(keys, name, tmp):
    """libCacheSim traces of bench_simulate.py: one flat file, or one per layer (moe)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_simulate
    from simcache.workload import next_use

    if name == "flat":
        path = Path(tmp) / "flat.oracleGeneral"
        bench_simulate.oracle_general(keys, next_use(keys, 256), path)
        return [path], 64
    paths = []
    for layer in range(32):
        k = keys[keys // 8 == layer]
        paths.append(Path(tmp) / f"moe{layer}.oracleGeneral")
        bench_simulate.oracle_general(k, next_use(k, 256), paths[-1])
    return paths, 4


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", help="checkouts; ratios are to the first")
    ap.add_argument("--cases", default="flat:lru,flat:belady,flat:markov,moe:lru,moe:belady,moe:markov")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--accesses", type=int, default=10_000_000)
    ap.add_argument("--lcs", action="store_true", help="time libCacheSim between the checkouts")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.accesses)
    sys.path.insert(0, str(ROOT))
    trees = [str(Path(t).resolve()) for t in a.trees]
    cases = [tuple(c.split(":")) for c in a.cases.split(",")]
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    procs = {t: subprocess.Popen([sys.executable, __file__, t, "--worker", t, "--accesses", str(a.accesses)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**env, "PYTHONPATH": t}) for t in trees}
    for t, p in procs.items():
        if p.stdout.readline().strip() != "ready":
            sys.exit(f"worker for {t} failed")

    def ask(t, line):
        procs[t].stdin.write(line + "\n")
        procs[t].stdin.flush()
        e, h, n = procs[t].stdout.readline().split()
        return float(e), int(h), int(n)

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        if a.lcs:
            import libcachesim as lcs
            import numpy as np

            sys.path.insert(0, str(ROOT / "bench"))
            from bench_simulate import lcs_run
            for name in {c[0] for c in cases}:
                ask(trees[-1], f"{name} keys {tmp}/{name}.npy")
                files[name] = lcs_files(np.load(f"{tmp}/{name}.npy"), name, tmp)
        for name, policy in cases:  # compile (or load from numba's cache) outside the rounds
            for t in trees:
                ask(t, f"{name} {policy}")
        best, hits, n = {}, {}, {}
        for r in range(a.rounds):
            for name, policy in cases:
                for t in trees if r % 2 == 0 else trees[::-1]:
                    e, hits[t, name, policy], n[name] = ask(t, f"{name} {policy}")
                    best[t, name, policy] = min(best.get((t, name, policy), float("inf")), e)
                if a.lcs and policy in LCS:
                    paths, capacity = files[name]
                    e = sum(lcs_run(getattr(lcs, LCS[policy]), p, capacity, 1)[0] for p in paths)
                    best["lcs", name, policy] = min(best.get(("lcs", name, policy), float("inf")), e)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print(f"best of {a.rounds} interleaved rounds; M accesses/s (ratio to {Path(trees[0]).name}; x libCacheSim)")
    for name, policy in cases:
        cells = [f"{name:5} {policy:14}"]
        for t in trees:
            k = (t, name, policy)
            cell = f"{Path(t).name}: {n[name] / best[k] / 1e6:6.1f} ({best[trees[0], name, policy] / best[k]:.3f}"
            if ("lcs", name, policy) in best:
                cell += f"; {best['lcs', name, policy] / best[k]:.2f}x"
            cells.append(cell + f") hits {hits[k]:,}")
        if ("lcs", name, policy) in best:
            cells.append(f"libCacheSim {n[name] / best['lcs', name, policy] / 1e6:.1f}")
        print("  ".join(cells))


if __name__ == "__main__":
    main()
