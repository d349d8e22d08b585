"""How steady is the host CPU's expert FFN on a GPU machine, and what slows it? (docs/hybrid.md)

Prints, and writes as JSON, one expert's host FFN time (the replay's own ``ffn`` in bf16 on the
replay's kind of memory: rows of one pinned host buffer, in rotation over at least 1 GiB) in
short windows, repeated over a minute or so, under four conditions:

* ``alone``: nothing else runs;
* ``executor``: through :class:`simcache.replay.cpu.HostExecutor` (worker thread, activations
  down and back), as the replay runs it;
* ``busy-one``: beside back-to-back copies of one pinned buffer to the GPU (the probe's copies
  before this recipe);
* ``busy-rotate``: beside back-to-back copies of distinct pinned rows to the GPU (as a replay's
  copies are);

and the copy engine's time for one expert alone and under each. Run from the repository root:

    python3 recipes/gpu_host_diag.py --preset mixtral-8x7b --threads 12 --out diag.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from simcache.replay.cpu import HostExecutor, Job, set_host_threads
from simcache.replay.experts import ffn
from simcache.replay.presets import PRESETS
from simcache.replay.probe import _Copies, host_experts


def window(fn, seconds):
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(times) < 5:
        c0 = time.perf_counter()
        fn(len(times))
        times.append(time.perf_counter() - c0)
    return float(np.median(times[1:] if len(times) > 2 else times)), len(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--threads", type=int, default=12)
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--window", type=float, default=0.4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to try the recipe without a GPU")
    a = ap.parse_args()
    p = PRESETS[a.preset]
    dev = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    dt = torch.bfloat16
    eb = p.expert_bytes(2)
    t0 = time.perf_counter()
    ffn_rows = host_experts(p, dt, pin=dev.type == "cuda")  # (n, W): the probe's rotation of pinned experts
    n_ffn = ffn_rows.shape[0]
    one = _Copies(dev, eb, rows=1)  # copies of one buffer
    rot = _Copies(dev, eb)  # copies of distinct rows, as a replay's
    n_copy = rot.src.shape[0]
    setup_s = time.perf_counter() - t0
    set_host_threads(a.threads)
    ex = HostExecutor(p.hidden, p.ffn, dev, a.threads, max_tokens=4096)
    copy_alone = float(np.median([rot.one() for _ in range(2 * n_copy)][2:]))
    tokens = [int(t) for t in a.tokens.split(",")]
    xs = {t: torch.randn((t, p.hidden), device=dev).to(dt) for t in tokens}
    xh = {t: xs[t].cpu() for t in tokens}
    gate = {t: torch.ones((t, 1), device=dev, dtype=dt) for t in tokens}
    idx = {t: torch.arange(t, device=dev) for t in tokens}
    rows = []
    env = {k: os.environ.get(k) for k in ("OMP_PROC_BIND", "OMP_PLACES", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    print(f"{a.preset}: {eb / 2**20:.1f} MiB experts, {n_ffn} in FFN rotation, {n_copy} in copy rotation; "
          f"threads {a.threads}; env {env}; setup {setup_s:.1f} s; copy alone {copy_alone * 1e3:.3f} ms", flush=True)
    start = time.perf_counter()
    for rnd in range(a.rounds):
        for t in tokens:
            x = xh[t]

            def plain(i, x=x):
                ffn(x, ffn_rows[i % n_ffn], p.hidden, p.ffn)

            def via_executor(i, t=t):
                tk = ex.submit(xs[t], [Job(ffn_rows[i % n_ffn], idx[t], gate[t])])
                out = torch.zeros_like(xs[t])
                ex.finish(tk, out)
                if dev.type == "cuda":
                    torch.cuda.synchronize()

            rec = {"round": rnd, "tokens": t, "at_s": time.perf_counter() - start}
            rec["alone_ms"], _ = window(plain, a.window)
            rec["executor_ms"], _ = window(via_executor, a.window)
            with one:
                rec["busy_one_ms"], _ = window(plain, a.window)
            rec["copy_one_ms"] = float(np.median(one.times)) * 1e3
            with rot:
                rec["busy_rotate_ms"], _ = window(plain, a.window)
            rec["copy_rotate_ms"] = float(np.median(rot.times)) * 1e3
            with rot:
                rec["executor_busy_rotate_ms"], _ = window(via_executor, a.window)
            for k in ("alone_ms", "executor_ms", "busy_one_ms", "busy_rotate_ms", "executor_busy_rotate_ms"):
                rec[k] *= 1e3
            rows.append(rec)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)
    ex.close()
    with open(a.out, "w") as f:
        json.dump({"preset": a.preset, "threads": a.threads, "env": env, "expert_bytes": eb,
                   "copy_alone_ms": copy_alone * 1e3, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
