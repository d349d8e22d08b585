"""Exact LRU miss-ratio curves in one pass (docs/design.md §13).

Under the cache semantics of docs/design.md §4, LRU at a capacity c no smaller than every (step,
layer) group is a stack algorithm: a group's hits are pinned, its misses always find an
unpinned victim, and after the group its experts sit on top of one recency stack in access
order, so the cache is always the top c of that stack (Mattson et al., "Evaluation
techniques for storage hierarchies", IBM Systems Journal 1970). One pass that records every
access's *stack distance* (its depth in the stack before its group, or "cold") gives LRU's
hits at every such capacity at once; fills, evictions and reloads follow from the cold
accesses, and the predicted time from a second pass over the groups that repeats the
simulator's arithmetic exactly. Capacities below the largest group run through
:func:`simcache.simulate`.

FIFO, LFU, random, Belady with pinning, Markov admission and every rule that bypasses are
not stack algorithms (their cache at c is not a subset of their cache at c + 1): they run
once per capacity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from simcache._jit import jit
from simcache.errors import SimcacheError
from simcache.simulator import (COMPUTE_S, COUNTERS, SCOPES, TIME_S, TIMES, SimResult, _derived_times, _timing,
                                simulate)
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


def stack_distances(work: Workload, scope: str = "layer") -> StackDistances:
    """LRU stack distances of every access of ``work`` (see module docstring)."""
    if scope not in SCOPES:
        raise SimcacheError(f"scope must be 'layer' or 'global', got {scope!r}")
    d = work.demand
    L, E = d.num_layers, d.num_experts
    pool = E if scope == "layer" else L * E
    start = time.perf_counter()
    dist = np.empty(d.num_accesses, np.int32)
    hist = np.zeros((L, pool), np.int64)
    cold = np.zeros(L, np.int64)
    cold_layers = np.empty(L * E, np.int16)
    n_cold = _distances(d.group_ptr, d.keys, L, E, scope == "layer", dist, hist, cold, cold_layers)
    sizes = np.diff(d.group_ptr)
    smallest = max(1, int(sizes.max()) if sizes.size else 1)
    return StackDistances(work, scope, dist, hist, cold, cold_layers[:n_cold].copy(), smallest,
                          time.perf_counter() - start)


@jit
def _distances(group_ptr, keys, L, E, per_layer, dist, hist, cold, cold_layers):
    """Move-to-front stacks, one per pool: a group reads its keys' depths, then moves them
    to the top in access order (the last accessed on top). Cost per group: the depth of its
    deepest key. Returns the number of cold accesses."""
    n_pools = L if per_layer else 1
    size = E if per_layer else L * E
    stack = np.empty((n_pools, size), np.int32)  # stack[pool, depth] = key
    depth = np.full(L * E, -1, np.int64)
    used = np.zeros(n_pools, np.int64)
    mark = np.full(L * E, -1, np.int64)
    n_cold = 0
    n_groups = group_ptr.shape[0] - 1
    for g in range(n_groups):
        lo = group_ptr[g]
        hi = group_ptr[g + 1]
        if lo == hi:
            continue
        l = g % L
        p = l if per_layer else 0
        deepest = -1
        new = 0
        for i in range(lo, hi):
            key = keys[i]
            dd = depth[key]
            dist[i] = dd
            mark[key] = g
            if dd < 0:
                new += 1
                cold[l] += 1
                cold_layers[n_cold] = l
                n_cold += 1
            else:
                hist[l, dd] += 1
                if dd > deepest:
                    deepest = dd
        if new > 0:
            deepest = used[p] - 1
        # shift the keys above the deepest one down past the group, then put the group on top
        w = deepest + new
        for pos in range(deepest, -1, -1):
            key = stack[p, pos]
            if mark[key] != g:
                stack[p, w] = key
                depth[key] = w
                w -= 1
        k = hi - lo
        for j in range(k):
            key = keys[lo + j]
            stack[p, k - 1 - j] = key
            depth[key] = k - 1 - j
        used[p] += new
    return n_cold


@jit
def _group_times(group_ptr, tokens, dist, L, capacities, lut, t_copy, overlap, layer_time):
    """The simulator's time arithmetic at each capacity, in its order (bit-identical sums):
    per group, compute over its accesses, loads = accesses at depth >= c or cold, the last
    miss's compute; ``layer_time[c, l] += (compute, time)`` (transfer and stall follow, as in
    :func:`simcache.simulator._derived_times`)."""
    n_groups = group_ptr.shape[0] - 1
    n_caps = capacities.shape[0]
    for g in range(n_groups):
        lo = group_ptr[g]
        hi = group_ptr[g + 1]
        if lo == hi:
            continue
        l = g % L
        for j in range(n_caps):
            c = capacities[j]
            loads = 0
            compute = 0.0
            last_miss = 0.0
            for i in range(lo, hi):
                cost = lut[tokens[i]]
                compute += cost
                if dist[i] < 0 or dist[i] >= c:
                    loads += 1
                    last_miss = cost
            transfer = loads * t_copy
            if overlap:
                t = max(compute, transfer + last_miss)
            else:
                t = compute + transfer
            layer_time[j, l, COMPUTE_S] += compute
            layer_time[j, l, TIME_S] += t


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
    come from one stack-distance pass; smaller ones run directly.

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
    caps = [int(c) for c in capacities]
    L, E = work.trace.num_layers, work.trace.num_experts
    in_scope = E if scope == "layer" else L * E
    for c in caps:
        if c <= 0 or c > in_scope:  # simulate names the problem
            simulate(work, "lru", c, scope=scope)
    if stack is None or stack.work is not work or stack.scope != scope:
        stack = stack_distances(work, scope) if any(c >= _smallest(work) for c in caps) else None
    out: dict[int, SimResult] = {}
    direct = sorted({c for c in caps if stack is None or c < stack.smallest})
    for c in direct:
        out[c] = simulate(work, "lru", c, scope=scope, calibration=calibration, overlap=overlap,
                          expert_bytes=expert_bytes)
    curve = sorted({c for c in caps if c not in out})
    if curve:
        start = time.perf_counter()
        eb, cal_name, t_copy, lut, ov = _timing(work, calibration, expert_bytes, overlap)
        d = work.demand
        layer_time = np.zeros((len(curve), L, len(TIMES)), np.float64)
        _group_times(d.group_ptr, d.tokens, stack.distance, L, np.asarray(curve, np.int64), lut,
                     t_copy, ov, layer_time)
        each = (time.perf_counter() - start + stack.elapsed_s) / len(curve)
        for j, c in enumerate(curve):
            per_layer = stack.counters(c)
            _derived_times(layer_time[j], per_layer["fills"], t_copy)
            per_layer.update({name: layer_time[j, :, t].copy() for t, name in enumerate(TIMES)})
            tr = work.trace
            out[c] = SimResult(
                policy="lru", evict="lru", admit="all", capacity=c, scope=scope, batch=work.batch,
                prefill=work.prefill, threshold=None, model=tr.model, num_layers=L, num_experts=E,
                top_k=tr.top_k, expert_bytes=eb, steps=work.steps.num_steps,
                decode_tokens=work.steps.decode_tokens, per_layer=per_layer, calibration=cal_name,
                elapsed_s=each,
            )
    return [out[c] for c in caps]


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
    elapsed_s: float

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
    for capacities >= the largest group, direct runs below.

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
    stack = stack_distances(work, scope)
    hits = np.zeros((caps.size, L), np.int64)
    cum = np.cumsum(stack.histogram, axis=1)
    for j, c in enumerate(caps):
        if c >= stack.smallest:
            hits[j] = cum[:, c - 1]
        else:
            hits[j] = simulate(work, "lru", int(c), scope=scope).per_layer["hits"]
    accesses = stack.histogram.sum(axis=1) + stack.cold
    return MissRatioCurve(scope, caps, hits, accesses, stack.smallest, time.perf_counter() - start)
