"""Exact LRU miss-ratio curves in one pass (docs/design.md §13).

Under the cache semantics of docs/design.md §4, LRU at a capacity c no smaller than every (step,
layer) group is a stack algorithm: a group's hits are pinned, its misses always find an
unpinned victim, and after the group its experts sit on top of one recency stack in access
order, so the cache is always the top c of that stack (Mattson et al., "Evaluation
techniques for storage hierarchies", IBM Systems Journal 1970). One pass that records every
access's *stack distance* (its depth in the stack before its group, or "cold") gives LRU's
hits at every such capacity at once; fills, evictions and reloads follow from the cold
accesses, and the predicted time from a second pass over the groups that repeats the
simulator's arithmetic exactly. Capacities below the largest group are not a stack
algorithm's; they run together in one pass of their own (:func:`_direct`), which repeats the
simulator's LRU group by group at each of them.

A pool of at most 64 experts keeps its stack as bitsets (:func:`_distances_bits`): each
expert's set of the experts used since its own last use, so a depth is a popcount and a group
one OR over the pool; a larger pool stamps each use and counts the stamps above a key's in a
Fenwick tree (:func:`_distances`).

FIFO, LFU, random, Belady with pinning, Markov admission and every rule that bypasses are
not stack algorithms (their cache at c is not a subset of their cache at c + 1): they run
once per capacity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from simcache._jit import jit
from simcache.errors import SimcacheError
from simcache.policies._dispatch import tag
from simcache.simulator import (ACCESSES, COMPUTE_S, COUNTERS, EVICTIONS, FILLS, FORCED_BYPASSES, HITS, RELOADS,
                                SCOPES, TIME_S, TIMES, SimResult, _check_capacity, _derived_times, _timing)
from simcache.timing import Calibration
from simcache.trace import Trace
from simcache.workload import Workload


@dataclass(frozen=True, eq=False)
class StackDistances:
    """Every access's LRU stack distance over one workload and scope.

    Attributes
    ----------
    distance : int32 (accesses,)
        Depth of the access's key in its pool's recency stack before its group (0 = most
        recent), or -1 for a key never seen before (a cold miss at every capacity).
    histogram : int64 (layers, pool size)
        ``histogram[l, d]``: accesses of layer l at distance d.
    cold : int64 (layers,)
        Cold accesses of each layer (its distinct keys).
    cold_layers : int16 (distinct keys,)
        Layer of each cold access, in stream order (which layer's misses fill a global
        pool's free slots).
    smallest : int
        The smallest capacity the curve covers: the largest group.
    """

    work: Workload
    scope: str
    distance: np.ndarray
    histogram: np.ndarray
    cold: np.ndarray
    cold_layers: np.ndarray
    smallest: int
    elapsed_s: float

    @property
    def pool_size(self) -> int:
        return int(self.histogram.shape[1])

    def hits(self, capacity: int) -> np.ndarray:
        """LRU hits per layer at ``capacity`` (>= :attr:`smallest`)."""
        if capacity < self.smallest:
            raise SimcacheError(f"the stack covers capacities >= {self.smallest}, got {capacity}")
        return self.histogram[:, :capacity].sum(axis=1)

    def counters(self, capacity: int) -> dict[str, np.ndarray]:
        """Per-layer counters of :func:`simcache.simulate` with LRU at ``capacity``."""
        accesses = self.histogram.sum(axis=1) + self.cold
        hits = self.hits(capacity)
        fills = accesses - hits
        if self.scope == "layer":
            free = np.minimum(self.cold, capacity)
        else:
            free = np.bincount(self.cold_layers[:capacity], minlength=self.histogram.shape[0])
        zero = np.zeros_like(hits)
        values = dict(hits=hits, fills=fills, bypasses=zero, forced_bypasses=zero.copy(),
                      evictions=fills - free, reloads=fills - self.cold, accesses=accesses,
                      cpu_experts=zero.copy(), cpu_tokens=zero.copy(), prefetched=zero.copy(),
                      prefetches=zero.copy(), prefetch_used=zero.copy())
        return {name: values[name].astype(np.int64) for name in COUNTERS}


def stack_distances(work: Workload, scope: str = "layer", *, distances: bool = True) -> StackDistances:
    """LRU stack distances of every access of ``work`` (see module docstring). With
    ``distances=False`` the per-access array is not kept (``distance`` is empty): the hit
    curve needs only the histogram, and 100 M accesses would be 400 MB."""
    if scope not in SCOPES:
        raise SimcacheError(f"scope must be 'layer' or 'global', got {scope!r}")
    d = work.demand
    L, E = d.num_layers, d.num_experts
    pool = E if scope == "layer" else L * E
    start = time.perf_counter()
    dist = np.empty(d.num_accesses if distances else 0, np.int32)
    hist = np.zeros((L, pool), np.int64)
    cold = np.zeros(L, np.int64)
    cold_layers = np.empty(L * E, np.int16)
    kernel = _distances_bits if pool <= 64 else _distances
    n_cold = kernel(d.group_ptr, d.keys, L, E, scope == "layer", dist, hist, cold, cold_layers)
    sizes = np.diff(d.group_ptr)
    smallest = max(1, int(sizes.max()) if sizes.size else 1)
    return StackDistances(work, scope, dist, hist, cold, cold_layers[:n_cold].copy(), smallest,
                          time.perf_counter() - start)


def _popcount(x):
    """Set bits of a uint64 (plain Python; jitted callers get one ``llvm.ctpop``)."""
    return bin(int(x)).count("1")


@intrinsic
def _ctpop(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@overload(_popcount, inline="always")
def _popcount_jit(x):
    def impl(x):
        return np.int64(_ctpop(np.uint64(x)))

    return impl


def _top_bit(x):
    """Index of the highest set bit of a non-zero uint64 (plain Python; jitted callers get
    one ``llvm.ctlz``)."""
    return int(x).bit_length() - 1


@intrinsic
def _ctlz(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.ctlz(args[0], context.get_constant(types.boolean, False))

    return types.uint64(types.uint64), codegen


@overload(_top_bit, inline="always")
def _top_bit_jit(x):
    def impl(x):
        return 63 - np.int64(_ctlz(np.uint64(x)))

    return impl


@jit
def _distances_bits(group_ptr, keys, L, E, per_layer, dist, hist, cold, cold_layers):
    """:func:`_distances` for pools of at most 64 keys, as bitsets: ``above[p, x]`` holds the
    keys of pool p used since x's last use, so x's depth is its popcount. A group reads its
    depths, ORs its keys into every key's set, then gives each of its keys the set of the
    group's keys after it (the last accessed on top). Cost per group: one pass over the pool."""
    record = dist.shape[0] > 0
    n_pools = L if per_layer else 1
    size = E if per_layer else L * E
    above = np.zeros((n_pools, size), np.uint64)
    seen = np.zeros(n_pools, np.uint64)
    one = np.uint64(1)
    n_cold = 0
    l = -1
    for g in range(group_ptr.shape[0] - 1):
        l += 1
        if l == L:
            l = 0
        lo = group_ptr[g]
        hi = group_ptr[g + 1]
        if lo == hi:
            continue
        p = l if per_layer else 0
        base = l * E if per_layer else 0
        row = above[p]
        known = seen[p]
        group = np.uint64(0)
        for i in range(lo, hi):
            x = keys[i] - base
            bit = one << np.uint64(x)
            group |= bit
            dd = -1
            if known & bit:
                dd = _popcount(row[x])
                hist[l, dd] += 1
            else:
                cold[l] += 1
                cold_layers[n_cold] = l
                n_cold += 1
            if record:
                dist[i] = dd
        seen[p] = known | group
        for z in range(size):
            row[z] |= group
        after = np.uint64(0)
        for i in range(hi - 1, lo - 1, -1):
            x = keys[i] - base
            row[x] = after
            after |= one << np.uint64(x)
    return n_cold


@jit
def _distances(group_ptr, keys, L, E, per_layer, dist, hist, cold, cold_layers):
    """Stack distances by timestamps: each key of a pool holds the stamp of its last use, and
    a Fenwick tree counts the pool's live stamps, so a depth is the number of live stamps
    above the key's (O(log) per access, whatever the depth). A group reads its depths, then
    stamps its keys in access order (the last accessed on top). When a pool runs out of
    stamps its live ones are renumbered in order. Returns the number of cold accesses; an
    empty ``dist`` is not written."""
    record = dist.shape[0] > 0
    n_pools = L if per_layer else 1
    size = E if per_layer else L * E
    T = 4 * size + 64
    tree = np.zeros((n_pools, T + 1), np.int32)  # Fenwick tree over each pool's stamps (1-based)
    owner = np.full((n_pools, T), -1, np.int32)  # key that took each stamp
    stamp = np.full(L * E, -1, np.int64)
    clock = np.zeros(n_pools, np.int64)
    live = np.zeros(n_pools, np.int64)
    n_cold = 0
    l = -1
    for g in range(group_ptr.shape[0] - 1):
        l += 1
        if l == L:
            l = 0
        lo = group_ptr[g]
        hi = group_ptr[g + 1]
        if lo == hi:
            continue
        p = l if per_layer else 0
        if clock[p] + (hi - lo) > T:  # renumber the live stamps 0..live-1, in order
            w = 0
            for s in range(clock[p]):
                key = owner[p, s]
                if key >= 0 and stamp[key] == s:
                    owner[p, w] = key
                    stamp[key] = w
                    w += 1
            for s in range(w, T):
                owner[p, s] = -1
            for s in range(1, T + 1):
                tree[p, s] = 1 if s <= w else 0
            for s in range(1, T + 1):  # linear build
                parent = s + (s & -s)
                if parent <= T:
                    tree[p, parent] += tree[p, s]
            clock[p] = w
        n_live = live[p]
        for i in range(lo, hi):
            key = keys[i]
            s = stamp[key]
            dd = -1
            if s < 0:
                cold[l] += 1
                cold_layers[n_cold] = l
                n_cold += 1
            else:
                below = 0  # live stamps <= s
                q = s + 1
                while q > 0:
                    below += tree[p, q]
                    q -= q & -q
                dd = n_live - below
                hist[l, dd] += 1
            if record:
                dist[i] = dd
        for i in range(lo, hi):
            key = keys[i]
            s = stamp[key]
            if s >= 0:
                q = s + 1
                while q <= T:
                    tree[p, q] -= 1
                    q += q & -q
            else:
                live[p] += 1
            s = clock[p]
            clock[p] = s + 1
            stamp[key] = s
            owner[p, s] = key
            q = s + 1
            while q <= T:
                tree[p, q] += 1
                q += q & -q
    return n_cold


@jit
def _group_times(group_ptr, tokens, dist, L, capacities, lut, t_copy, overlap, layer_time):
    """The simulator's time arithmetic at each capacity, in its order (bit-identical sums):
    per group, compute over its accesses, loads = accesses at depth >= c or cold, the last
    miss's compute; ``layer_time[c, l] += (compute, time)`` (transfer and stall follow, as in
    :func:`simcache.simulator._derived_times`). The capacities are the inner loop, over
    contiguous arrays (one vector instruction serves several); compute is the same sum at
    every capacity, so it is added once per layer."""
    n_caps = capacities.shape[0]
    loads = np.zeros(n_caps, np.int64)
    last_miss = np.zeros(n_caps, np.float64)
    time_s = np.zeros((L, n_caps), np.float64)
    compute_s = np.zeros(L, np.float64)
    cold = np.int64(1) << 62
    l = -1
    for g in range(group_ptr.shape[0] - 1):
        l += 1
        if l == L:
            l = 0
        lo = group_ptr[g]
        hi = group_ptr[g + 1]
        if lo == hi:
            continue
        for j in range(n_caps):
            loads[j] = 0
            last_miss[j] = 0.0
        compute = 0.0
        for i in range(lo, hi):
            cost = lut[tokens[i]]
            compute += cost
            d = np.int64(dist[i])
            if d < 0:
                d = cold
            for j in range(n_caps):
                miss = d >= capacities[j]
                loads[j] += miss
                last_miss[j] = cost if miss else last_miss[j]
        compute_s[l] += compute
        for j in range(n_caps):
            transfer = loads[j] * t_copy
            if overlap:
                t = max(compute, transfer + last_miss[j])
            else:
                t = compute + transfer
            time_s[l, j] += t
    for j in range(n_caps):
        for l in range(L):
            layer_time[j, l, COMPUTE_S] += compute_s[l]
            layer_time[j, l, TIME_S] += time_s[l, j]


@jit
def _direct(group_ptr, keys, tokens, L, E, per_layer, caps, lut, t_copy, overlap, counters, layer_time, words):
    """The simulator's LRU at every capacity of ``caps`` in one pass over the groups:
    ``counters[j, l]`` and ``layer_time[j, l]`` as :func:`simcache.simulator._run` fills them
    for LRU at ``caps[j]`` (bit-identical sums). A group's keys are strictly ascending
    (:func:`simcache.workload.demand` writes them so; a trace's row never repeats an expert).

    A capacity's pool is a bitset of residents. A group pins its h resident keys; of its
    misses, the first ``free + unpinned`` in access order (ascending keys: the lowest bits)
    fill: free slots first, then the unpinned residents from the least recent; the rest are
    forced bypasses; the last miss (the highest bit) is the one whose compute waits on its
    copy. A resident's last touch is its last access (an access that leaves a key out of the
    cache is a forced bypass, and the key stays out until its next access), so one ``last``
    array ranks the victims of every capacity.

    ``words``: a tuple as long as a pool's bitset (64 keys a word), so that numba compiles the
    word loops for that length (one word: 30% faster; :func:`simcache.policies._dispatch.tag`)."""
    n_caps = caps.shape[0]
    n_pools = L if per_layer else 1
    W = len(words)
    resident = np.zeros((n_caps, n_pools, W), np.uint64)
    evicted = np.zeros((n_caps, n_pools, W), np.uint64)
    used = np.zeros((n_caps, n_pools), np.int64)
    group = np.zeros(W, np.uint64)
    cost_of = np.zeros(W * 64, np.float64)
    last = np.zeros(L * E, np.int64)
    compute_s = np.zeros(L, np.float64)
    accesses = np.zeros(L, np.int64)
    one = np.uint64(1)
    l = -1
    for g in range(group_ptr.shape[0] - 1):
        l += 1
        if l == L:
            l = 0
        lo = group_ptr[g]
        hi = group_ptr[g + 1]
        if lo == hi:
            continue
        p = l if per_layer else 0
        base = l * E if per_layer else 0
        k = hi - lo
        w0 = (keys[lo] - base) >> 6 if W > 1 else 0
        w1 = (keys[hi - 1] - base) >> 6 if W > 1 else 0
        compute = 0.0
        for i in range(lo, hi):
            x = keys[i] - base
            group[x >> 6] |= one << np.uint64(x & 63)
            cost = lut[tokens[i]]
            cost_of[x] = cost
            compute += cost
            last[keys[i]] = i  # (the victims below are not in this group)
        compute_s[l] += compute
        for j in range(n_caps):
            n = used[j, p]
            h = 0
            for w in range(w0, w1 + 1):
                h += _popcount(resident[j, p, w] & group[w])
            misses = k - h
            free = caps[j] - n
            admitted = min(misses, free + n - h)
            gone = max(admitted - free, 0)
            last_miss = 0.0
            if misses > 0:  # (before the fills below)
                for w in range(w1, w0 - 1, -1):
                    m = group[w] & ~resident[j, p, w]
                    if m:
                        last_miss = cost_of[w * 64 + _top_bit(m)]
                        break
            if gone == n - h:  # every unpinned resident goes (always when k > capacity)
                if gone > 0:
                    for w in range(W):
                        evicted[j, p, w] |= resident[j, p, w] & ~group[w]
                        resident[j, p, w] &= group[w]
            else:
                for _ in range(gone):  # the least recent unpinned resident, one at a time
                    victim = -1
                    for w in range(W):
                        u = resident[j, p, w] & ~group[w]
                        while u:
                            b = u & (~u + one)
                            x = w * 64 + _popcount(b - one)
                            if victim < 0 or last[base + x] < last[base + victim]:
                                victim = x
                            u ^= b
                    bit = one << np.uint64(victim & 63)
                    resident[j, p, victim >> 6] &= ~bit
                    evicted[j, p, victim >> 6] |= bit
            left = admitted
            reloads = 0
            for w in range(w0, w1 + 1):
                if left == 0:
                    break
                m = group[w] & ~resident[j, p, w]
                if _popcount(m) > left:  # the lowest `left` bits
                    take = np.uint64(0)
                    for _ in range(left):
                        b = m & (~m + one)
                        take |= b
                        m ^= b
                    m = take
                resident[j, p, w] |= m
                reloads += _popcount(m & evicted[j, p, w])
                left -= _popcount(m)
            used[j, p] = n - gone + admitted
            counters[j, l, HITS] += h
            counters[j, l, FILLS] += admitted
            counters[j, l, FORCED_BYPASSES] += misses - admitted
            counters[j, l, EVICTIONS] += gone
            counters[j, l, RELOADS] += reloads
            transfer = misses * t_copy
            if overlap:
                t = max(compute, transfer + last_miss)
            else:
                t = compute + transfer
            layer_time[j, l, TIME_S] += t
        for w in range(w0, w1 + 1):
            group[w] = 0
        accesses[l] += k
    for j in range(n_caps):  # the same at every capacity (the same sums, in the same order)
        for l in range(L):
            counters[j, l, ACCESSES] += accesses[l]
            layer_time[j, l, COMPUTE_S] += compute_s[l]


def lru_results(
    trace: Trace | Workload,
    capacities,
    *,
    scope: str = "layer",
    batch: int = 1,
    prefill: str = "skip",
    calibration: Calibration | None = None,
    overlap: bool | None = None,
    expert_bytes: int | None = None,
    stack: StackDistances | None = None,
) -> list[SimResult]:
    """LRU at every capacity in ``capacities``: equal, field by field except ``elapsed_s``,
    to ``simulate(trace, "lru", c, ...)`` for each c. Capacities at least the largest group
    come from one stack-distance pass; smaller ones from one direct pass (:func:`_direct`).

    Examples
    --------
    >>> import numpy as np, simcache
    >>> from simcache.mrc import lru_results
    >>> t = simcache.synth(8, 64, num_layers=2, num_experts=8, top_k=2, seed=1)
    >>> [r.hits for r in lru_results(t, [1, 2, 4, 8])] == [
    ...     simcache.simulate(t, "lru", c).hits for c in [1, 2, 4, 8]]
    True
    """
    work = trace if isinstance(trace, Workload) else Workload(trace, batch, prefill)
    caps = list(capacities)
    L, E = work.trace.num_layers, work.trace.num_experts
    for c in caps:
        _check_capacity(c, scope, L, E)
    caps = [int(c) for c in caps]
    eb, cal_name, t_copy, lut, ov = _timing(work, calibration, expert_bytes, overlap)
    smallest = _smallest(work)
    # (a stack kept without its distances cannot price the groups)
    if (stack is None or stack.work is not work or stack.scope != scope
            or stack.distance.size != work.demand.num_accesses):
        stack = stack_distances(work, scope) if any(c >= smallest for c in caps) else None
    out: dict[int, SimResult] = {}

    def result(c, per_layer, layer_time, elapsed):
        _derived_times(layer_time, per_layer["fills"] + per_layer["forced_bypasses"], t_copy)
        per_layer.update({name: layer_time[:, t].copy() for t, name in enumerate(TIMES)})
        tr = work.trace
        return SimResult(
            policy="lru", evict="lru", admit="all", capacity=c, scope=scope, batch=work.batch,
            prefill=work.prefill, threshold=None, model=tr.model, num_layers=L, num_experts=E,
            top_k=tr.top_k, expert_bytes=eb, steps=work.steps.num_steps,
            decode_tokens=work.steps.decode_tokens, per_layer=per_layer, calibration=cal_name,
            elapsed_s=elapsed,
        )

    direct = sorted({c for c in caps if c < smallest})
    if direct:
        counters, layer_time, elapsed = _direct_runs(work, scope, direct, lut, t_copy, ov)
        for j, c in enumerate(direct):
            out[c] = result(c, {name: counters[j, :, t].copy() for t, name in enumerate(COUNTERS)},
                            layer_time[j], elapsed / len(direct))
    curve = sorted({c for c in caps if c not in out})
    if curve:
        start = time.perf_counter()
        d = work.demand
        layer_time = np.zeros((len(curve), L, len(TIMES)), np.float64)
        _group_times(d.group_ptr, d.tokens, stack.distance, L, np.asarray(curve, np.int64), lut,
                     t_copy, ov, layer_time)
        each = (time.perf_counter() - start + stack.elapsed_s) / len(curve)
        for j, c in enumerate(curve):
            out[c] = result(c, stack.counters(c), layer_time[j], each)
    return [out[c] for c in caps]


def _direct_runs(work: Workload, scope: str, caps, lut, t_copy: float, overlap: bool):
    """(counters (caps, layers, COUNTERS), layer times (caps, layers, TIMES) before
    :func:`_derived_times`, seconds) of LRU at each capacity of ``caps``, in one pass."""
    d = work.demand
    L, E = d.num_layers, d.num_experts
    counters = np.zeros((len(caps), L, len(COUNTERS)), np.int64)
    layer_time = np.zeros((len(caps), L, len(TIMES)), np.float64)
    start = time.perf_counter()
    words = ((E if scope == "layer" else L * E) + 63) // 64
    _direct(d.group_ptr, d.keys, d.tokens, L, E, scope == "layer", np.asarray(caps, np.int64), lut, t_copy,
            overlap, counters, layer_time, tag(words - 1))
    return counters, layer_time, time.perf_counter() - start


def _smallest(work: Workload) -> int:
    sizes = np.diff(work.demand.group_ptr)
    return max(1, int(sizes.max()) if sizes.size else 1)


@dataclass
class MissRatioCurve:
    """LRU's hit ratio at every capacity 1..pool size, per layer and overall."""

    scope: str
    capacities: np.ndarray
    hits: np.ndarray  # (capacities, layers)
    accesses: np.ndarray  # (layers,)
    smallest_stack: int
    elapsed_s: float  # in all, the workload build included when given a Trace
    stack_s: float = 0.0  # the stack pass (capacities >= smallest_stack)
    direct_s: float = 0.0  # the direct pass (capacities below)

    @property
    def hit_ratio(self) -> np.ndarray:
        total = self.accesses.sum()
        return self.hits.sum(axis=1) / total if total else np.zeros(len(self.capacities))

    @property
    def miss_ratio(self) -> np.ndarray:
        return 1.0 - self.hit_ratio

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame({"capacity": self.capacities, "hits": self.hits.sum(axis=1),
                              "accesses": int(self.accesses.sum()), "hit_ratio": self.hit_ratio,
                              "miss_ratio": self.miss_ratio,
                              "method": np.where(self.capacities >= self.smallest_stack, "stack", "direct")})
        for l in range(self.hits.shape[1]):
            frame[f"hit_ratio_layer{l}"] = self.hits[:, l] / max(int(self.accesses[l]), 1)
        return frame


def lru_curve(trace: Trace | Workload, *, scope: str = "layer", batch: int = 1,
              prefill: str = "skip", capacities=None) -> MissRatioCurve:
    """LRU hits at every capacity (default 1..E per layer, 1..L*E global): one stack pass
    for capacities >= the largest group, one direct pass for those below.

    >>> import simcache
    >>> from simcache.mrc import lru_curve
    >>> t = simcache.synth(8, 64, num_layers=2, num_experts=8, top_k=2, seed=1)
    >>> c = lru_curve(t)
    >>> int(c.hits[3].sum()) == simcache.simulate(t, "lru", 4).hits
    True
    """
    start = time.perf_counter()
    work = trace if isinstance(trace, Workload) else Workload(trace, batch, prefill)
    L, E = work.trace.num_layers, work.trace.num_experts
    in_scope = E if scope == "layer" else L * E
    caps = np.arange(1, in_scope + 1) if capacities is None else np.asarray(sorted(set(capacities)), np.int64)
    if caps.size == 0 or caps[0] < 1 or caps[-1] > in_scope:
        raise SimcacheError(f"capacities must lie in 1..{in_scope} for scope {scope}")
    stack = stack_distances(work, scope, distances=False)
    hits = np.zeros((caps.size, L), np.int64)
    cum = np.cumsum(stack.histogram, axis=1)
    direct = caps < stack.smallest
    direct_s = 0.0
    if direct.any():  # hits only: no time (no FFN or copy seconds)
        counters, _, direct_s = _direct_runs(work, scope, caps[direct], np.zeros(work.max_tokens + 1), 0.0, False)
        hits[direct] = counters[:, :, HITS]
    hits[~direct] = cum[:, caps[~direct] - 1].T
    accesses = stack.histogram.sum(axis=1) + stack.cold
    return MissRatioCurve(scope, caps, hits, accesses, stack.smallest, time.perf_counter() - start,
                          stack.elapsed_s, direct_s)
