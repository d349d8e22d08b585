"""Hybrid execution (docs/design.md §11): serve a (step, layer)'s misses by copy or on the host CPU.

Three executors work at once on a group: the GPU computes the residents and the copied
experts, the copy engine moves copied experts' weights host -> device, and the host CPU
computes the other misses on their tokens (one expert at a time on all its threads; each
sends its activations down and its results back). The group takes

    max(GPU path, CPU path)
    GPU path = max(gpu_s, copy_s + FFN of the last copied expert)   (a copy stream: overlap)
             = gpu_s + copy_s                                        (serial copies)
    CPU path = cpu_s = hand-off + sum over CPU experts of (host FFN + activation round trip)

with ``gpu_s`` the GPU FFN of hits and copied experts and ``copy_s`` = copies x copy time. The
hand-off (the calibration's ``cpu_group_s``) is paid once by a group with any CPU expert: the
CPU side waking for the group's tokens and the GPU side picking its results up.
Each path is priced at its *concurrent* rate: the CPU at its while-copies-run rate when a copy
runs beside it, a copy at its while-the-CPU-computes rate when a CPU expert runs beside it.

``--miss`` picks who serves the misses:

* ``load``: every miss is copied (docs/design.md §4; the simulator keeps its own code path for it);
* ``cpu``: every miss is computed on the CPU (j = 0 below);
* ``auto``: the reference rule of docs/design.md §11 -- sort the misses by token count, descending
  (ties in expert order); the first j are copied, the rest go to the CPU; j minimises the
  group's time (ties to the larger j: a copied expert may be cached for later groups);
* ``auto-cputime``: the same with the misses sorted by the CPU time each would take (its
  busy-rate CPU path), descending. It equals ``auto`` when the CPU table rises with token
  count, and is better where it does not: on the H200 host table (16 tokens run faster than 1)
  it reaches the best of every subset on every sampled group, where ``auto`` misses it on about
  one group in nine by up to 25 % (``bench/bench_hybrid_rule.py``, docs/hybrid.md).

:func:`split` is the whole composition, in one function, so that a richer timeline (a copy
engine carried across groups) can replace it. Its plain-Python twin is
``tests/naive.py:group_split``.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from simcache._jit import kernel as jit
from simcache.errors import SimcacheError

MISS_MODES = ("load", "cpu", "auto", "auto-cputime")
LOAD, CPU, AUTO, AUTO_CPUTIME = range(4)
# split's out[]: GPU FFN seconds, copy-engine seconds, CPU path seconds, group seconds
GPU_S, COPY_S, CPU_S, TOTAL_S = range(4)


def miss_code(miss: str) -> int:
    """The code of a ``--miss`` mode; a one-line error for anything else."""
    if miss not in MISS_MODES:
        raise SimcacheError(f"--miss must be one of {', '.join(MISS_MODES)}, got {miss!r}")
    return MISS_MODES.index(miss)


@jit
def split(miss_tok, m, hit_s, gpu_lut, cpu_lut, cpu_busy_lut, t_copy, t_copy_busy, cpu_group, overlap,
          mode, order, suffix, out):
    """Assign a group's ``m`` misses to the copy path or the CPU; return j, the number copied.
    (The caller's bookkeeping does the rest: copied misses go through admission, §4.)

    Parameters
    ----------
    miss_tok : int array, first ``m`` entries used
        Tokens routed to each miss, in expert order (the order copies are issued in).
    hit_s : float
        GPU FFN seconds of the group's hits.
    gpu_lut, cpu_lut, cpu_busy_lut : float arrays indexed by token count
        One expert's GPU FFN seconds; its CPU path seconds (host FFN + activation round trip),
        alone and while copies run.
    t_copy, t_copy_busy : float
        One expert copy's seconds, alone and while the CPU computes.
    cpu_group : float
        The CPU path's fixed seconds per group with any CPU expert (the hand-off).
    overlap : bool
        Copies run on a side stream, concurrently with GPU compute.
    mode : int
        CPU (j = 0: every miss on the CPU), AUTO (the reference rule) or AUTO_CPUTIME.
    order, suffix : scratch arrays of at least ``m`` ints / ``m + 1`` floats
        On return ``order[:j]`` are the positions (into ``miss_tok``) of the copied misses.
    out : float array of 4
        GPU_S, COPY_S, CPU_S, TOTAL_S of the chosen j.
    """
    if m == 0:  # all hits (the common group): nothing to split
        out[GPU_S] = hit_s
        out[COPY_S] = 0.0
        out[CPU_S] = 0.0
        out[TOTAL_S] = hit_s
        return 0
    # misses by token count (or CPU time), descending; ties keep expert order (insertion sort:
    # m is small)
    by_time = mode == AUTO_CPUTIME
    for a in range(m):
        key = cpu_busy_lut[miss_tok[a]] if by_time else miss_tok[a]
        b = a
        while b > 0 and (cpu_busy_lut[miss_tok[order[b - 1]]] if by_time else miss_tok[order[b - 1]]) < key:
            order[b] = order[b - 1]
            b -= 1
        order[b] = a
    # CPU path of the misses order[k:] (k < m), alone (no copy runs: k = 0) and while copies
    # run, the hand-off first
    suffix[m] = cpu_group
    for k in range(m - 1, -1, -1):
        suffix[k] = suffix[k + 1] + cpu_busy_lut[miss_tok[order[k]]]
    cpu_alone = cpu_group
    for k in range(m - 1, -1, -1):
        cpu_alone += cpu_lut[miss_tok[order[k]]]
    best_j = 0
    best_t = max(hit_s, cpu_alone)
    out[GPU_S] = hit_s
    out[COPY_S] = 0.0
    out[CPU_S] = cpu_alone
    out[TOTAL_S] = best_t
    if mode == CPU:
        return 0
    gpu = hit_s
    last = -1  # the copied miss issued last: the highest position in expert order
    for j in range(1, m + 1):
        a = order[j - 1]
        gpu += gpu_lut[miss_tok[a]]
        if a > last:
            last = a
        cpu = suffix[j] if j < m else 0.0
        copy = j * (t_copy_busy if j < m else t_copy)
        if overlap:
            path = max(gpu, copy + gpu_lut[miss_tok[last]])
        else:
            path = gpu + copy
        t = max(path, cpu)
        if t <= best_t:
            best_j = j
            best_t = t
            out[GPU_S] = gpu
            out[COPY_S] = copy
            out[CPU_S] = cpu
            out[TOTAL_S] = t
    return best_j


# What the simulation loop needs for --miss cpu|auto: the CPU tables and per-group scratch.
Hybrid = namedtuple("Hybrid", [
    "cpu_lut",  # (max tokens + 1,) float64: CPU path seconds of one expert, no copy beside it
    "cpu_busy_lut",  # (max tokens + 1,) float64: the same while copies run
    "t_copy_busy",  # float: one copy's seconds while the CPU computes
    "cpu_group",  # float: the CPU path's hand-off, once per group with a CPU expert
    "miss_tok",  # (max group,) int64: tokens of the group's misses, in expert order
    "order",  # (max group,) int64: split's ranking; order[:j] are copied
    "suffix",  # (max group + 1,) float64
    "to_cpu",  # (max group,) bool: miss a of the group goes to the CPU
    "out",  # (4,) float64: GPU_S, COPY_S, CPU_S, TOTAL_S of the group
])


def new_hybrid(cal, expert_bytes, max_tokens: int, max_group: int, miss: str) -> Hybrid:
    """The loop's hybrid tables from a calibration (checked: ``--miss cpu|auto`` needs a CPU
    table), or placeholders for ``--miss load`` / no timing (``cal`` None)."""
    n = max(int(max_group), 1)
    if cal is None or miss == "load":
        cpu = busy = np.zeros(max_tokens + 1)
        t_busy = group = 0.0
    else:
        cal.require_cpu(miss)
        _, cpu, busy, _, t_busy = luts(cal, expert_bytes, max_tokens)
        group = cal.cpu_group_s
    return Hybrid(cpu, busy, float(t_busy), float(group), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n + 1),
                  np.zeros(n, np.bool_), np.zeros(4))


@jit
def plan(H, S, tokens, lo, hi, stamp, gpu_lut, t_copy, overlap, mode):
    """Pass 1 of a group under ``--miss cpu|auto``: pin the demanded residents (as the loop
    does), collect the misses, :func:`split` them and mark which go to the CPU (``H.to_cpu``,
    by miss rank in expert order). The group's times land in ``H.out``."""
    m = 0
    hit_s = 0.0
    for i in range(lo, hi):
        slot = S.where[S.keys[i]]
        S.pin[slot] = stamp  # (an absent key pins the spare last entry)
        if slot >= 0:
            hit_s += gpu_lut[tokens[i]]
        else:
            H.miss_tok[m] = tokens[i]
            m += 1
    j = split(H.miss_tok, m, hit_s, gpu_lut, H.cpu_lut, H.cpu_busy_lut, t_copy, H.t_copy_busy, H.cpu_group, overlap,
              mode, H.order, H.suffix, H.out)
    for a in range(m):
        H.to_cpu[a] = True
    for a in range(j):
        H.to_cpu[H.order[a]] = False
    return m


def luts(cal, expert_bytes: int, max_tokens: int):
    """The per-token-count tables :func:`split` reads, from a calibration: GPU FFN, CPU path
    alone and while copies run (host FFN + activation round trip), copy seconds alone and busy.
    """
    n = np.arange(max_tokens + 1)
    gpu = cal.ffn_seconds_for(n, expert_bytes)
    rt = cal.roundtrip_seconds_for(n)
    cpu = cal.cpu_seconds_for(n, expert_bytes, busy=False) + rt
    cpu_busy = cal.cpu_seconds_for(n, expert_bytes, busy=True) + rt
    return gpu, cpu, cpu_busy, cal.copy_seconds(expert_bytes), cal.copy_seconds_busy(expert_bytes)


def group_split(hit_tokens, miss_tokens, cal, expert_bytes: int, miss: str = "auto",
                overlap: bool | None = None):
    """One group's assignment and times, for exploration and docs.

    Returns ``(copied, times)``: the positions (into ``miss_tokens``) of the copied misses
    and a dict of ``gpu_s``, ``copy_s``, ``cpu_s``, ``time_s``.

    Examples
    --------
    >>> from simcache.timing import default_calibration, MIXTRAL_EXPERT_BYTES
    >>> copied, t = group_split([1], [1, 1], default_calibration(), MIXTRAL_EXPERT_BYTES)
    >>> copied, round(t["time_s"] * 1e3, 2)   # one copy beside one CPU expert on the H200
    ([0], 7.38)
    """
    code = miss_code(miss)
    if code == LOAD:
        raise SimcacheError("group_split prices --miss cpu or auto (load is the simulator's own path)")
    cal.require_cpu(miss)
    hit_tokens = np.asarray(hit_tokens, np.int64)
    miss_tokens = np.asarray(miss_tokens, np.int64)
    top = int(max(hit_tokens.max(initial=0), miss_tokens.max(initial=0)))
    gpu, cpu, cpu_busy, t_copy, t_busy = luts(cal, expert_bytes, top)
    m = miss_tokens.size
    order = np.zeros(max(m, 1), np.int64)
    suffix = np.zeros(m + 1)
    out = np.zeros(4)
    ov = cal.overlap if overlap is None else bool(overlap)
    hit_s = float(sum(gpu[t] for t in hit_tokens))
    j = split(miss_tokens, m, hit_s, gpu, cpu, cpu_busy, t_copy, t_busy, cal.cpu_group_s, ov, code, order,
              suffix, out)
    return sorted(order[:j].tolist()), dict(zip(("gpu_s", "copy_s", "cpu_s", "time_s"), out.tolist()))



def assigned_times(hit_tokens, miss_tokens, to_cpu, cal, expert_bytes: int, overlap: bool | None = None) -> dict:
    """One group's times for a *given* assignment: the misses with ``to_cpu`` on the host, the
    others copied (issued in expert order, the order of ``miss_tokens``), priced as
    :func:`split` prices its chosen j; for re-pricing a schedule that ran (a replay at the
    host's measured rate) without choosing again. A dict of ``gpu_s``, ``copy_s``, ``cpu_s``,
    ``time_s``.

    Examples
    --------
    >>> from simcache.timing import default_calibration, MIXTRAL_EXPERT_BYTES
    >>> cal = default_calibration()
    >>> copied, best = group_split([1], [1, 1], cal, MIXTRAL_EXPERT_BYTES)
    >>> given = assigned_times([1], [1, 1], [a not in copied for a in range(2)], cal, MIXTRAL_EXPERT_BYTES)
    >>> given["time_s"] == best["time_s"]   # the rule's own choice, priced again
    True
    """
    cal.require_cpu("auto")
    hit_tokens = np.asarray(hit_tokens, np.int64)
    miss_tokens = np.asarray(miss_tokens, np.int64)
    to_cpu = np.asarray(to_cpu, np.bool_)
    if to_cpu.shape != miss_tokens.shape:
        raise SimcacheError(f"assigned_times: {to_cpu.size} CPU flags for {miss_tokens.size} misses")
    top = int(max(hit_tokens.max(initial=0), miss_tokens.max(initial=0)))
    gpu, cpu, cpu_busy, t_copy, t_busy = luts(cal, expert_bytes, top)
    out = assigned(float(gpu[hit_tokens].sum()), miss_tokens, to_cpu, gpu, cpu, cpu_busy, t_copy, t_busy,
                   cal.cpu_group_s, cal.overlap if overlap is None else bool(overlap))
    return dict(zip(("gpu_s", "copy_s", "cpu_s", "time_s"), out))


def assigned(hit_s, miss_tokens, to_cpu, gpu_lut, cpu_lut, cpu_busy_lut, t_copy, t_copy_busy, cpu_group, overlap):
    """(GPU_S, COPY_S, CPU_S, TOTAL_S) of a group whose misses are assigned (``to_cpu``), the
    tables as :func:`split`'s; its plain-Python twin is ``tests/naive.py:group_time``."""
    miss_tokens = np.asarray(miss_tokens, np.int64)
    to_cpu = np.asarray(to_cpu, np.bool_)
    copied = np.flatnonzero(~to_cpu)
    on_cpu = miss_tokens[to_cpu]
    g = hit_s + float(gpu_lut[miss_tokens[copied]].sum())
    c = cpu_group + float((cpu_busy_lut if copied.size else cpu_lut)[on_cpu].sum()) if on_cpu.size else 0.0
    copy = copied.size * (t_copy_busy if on_cpu.size else t_copy)
    if not copied.size:
        path = g
    elif overlap:
        path = max(g, copy + float(gpu_lut[miss_tokens[copied[-1]]]))
    else:
        path = g + copy
    return g, copy, c, max(path, c)
