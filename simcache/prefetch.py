"""Prefetch predictors (docs/design.md §12): which experts to copy before their demand is known.

A predictor turns a :class:`~simcache.workload.Workload` into a *plan*: for every (step, layer)
group g, up to ``width`` keys in priority order, requested when g's demand is known (at g's
start, behind g's demand copies) for the group ``g + distance``:

``oracle``
    The true demand of the next layer of the same step (distance 1; none from the last layer),
    in expert order - the order its misses would be loaded in, so that the oracle fills exactly
    what the demand would, only earlier: the bound a next-layer predictor can reach.
``lookahead``
    The trace's ``lookahead`` column: per token and layer l, the experts router l+1 picks when
    applied to layer l's MoE input, highest score first. Each token of the step votes for its
    first ``width`` entries; most votes first (ties: the better best rank, then the lower id).
    Distance 1; none from the last layer.
``markov``
    The Markov admission learner's score of the next token at this layer: s = sum over the
    group's demanded experts i of T[l, i, :], highest first (zero scores are not prefetched),
    with T learned online and causally exactly as :mod:`simcache.policies.admission.markov`
    learns it (seeded by ``prior``, fitted on a separate trace). Distance L: the same layer of
    the next step.

The plan is computed once, before the simulation (future knowledge stays out of the loop);
what the kernel actually copies (a planned expert already resident, or arriving when its
group has started, is dropped) is its own business, see :mod:`simcache.timeline`.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import numpy as np

from simcache import timeline as tl
from simcache._jit import jit, kernel
from simcache.errors import SimcacheError
from simcache.policies import _dispatch as dispatch
from simcache.policies.admission import markov as markov_admission
from simcache.state import Learner
from simcache.timeline import begin, demand, end, new_timeline, next_start, request, use  # noqa: F401
from simcache.workload import Workload


@dataclass(frozen=True)
class Predictor:
    name: str
    code: int
    summary: str


PREDICTORS = {
    p.name: p
    for p in (
        Predictor("none", 0, "no prefetch"),
        Predictor("oracle", 1, "the next layer's true demand (the bound)"),
        Predictor("lookahead", 2, "router l+1 on layer l's input (trace column 'lookahead')"),
        Predictor("markov", 3, "the learned transition counts' next token at this layer"),
    )
}


@dataclass(frozen=True, eq=False)
class Plan:
    """Per group g: ``keys[ptr[g]:ptr[g+1]]`` are requested at g's start for group
    ``g + distance``, in priority order."""

    predictor: str
    width: int
    distance: int
    ptr: np.ndarray  # (groups + 1,) int64
    keys: np.ndarray  # (requests,) int32


def plan(work: Workload, predictor: str, width: int, *, prior=None, decay_every: int = 100,
         decay: float = 0.99) -> Plan:
    """The prefetch plan of ``predictor`` at ``width`` experts per predicted group.

    Examples
    --------
    >>> import numpy as np, simcache
    >>> from simcache.workload import Workload
    >>> t = simcache.Trace.from_arrays(np.array([[0], [2], [1], [3]]), request=[0] * 4,
    ...     position=[0, 0, 1, 1], layer=[0, 1, 0, 1], num_experts=4)
    >>> p = plan(Workload(t), "oracle", 1)
    >>> p.distance, p.keys.tolist()  # layer 0 of each step requests layer 1's expert
    (1, [6, 7])
    """
    if predictor not in PREDICTORS:
        raise SimcacheError(f"unknown prefetch predictor '{predictor}' (choose from {', '.join(PREDICTORS)})")
    tr, d = work.trace, work.demand
    L, E = tr.num_layers, tr.num_experts
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= E:
        raise SimcacheError(f"prefetch width must be an integer in [1, {E}] (the experts per layer), got {width!r}")
    n_groups = d.group_ptr.shape[0] - 1
    ptr = np.zeros(n_groups + 1, np.int64)
    keys = np.zeros(n_groups * int(width), np.int32)
    scratch = np.zeros(2 * E)
    if predictor == "none":
        return Plan(predictor, int(width), 1, ptr, keys[:0])
    if predictor == "oracle":
        _oracle(d.group_ptr, d.keys, L, E, int(width), ptr, keys)
        distance = 1
    elif predictor == "lookahead":
        la = lookahead_column(tr)
        _lookahead(work.steps.step_ptr, work.steps.step_tokens, la, L, E, int(width), scratch, ptr, keys)
        distance = 1
    else:
        M = _learner(work, prior, decay_every, decay)
        _markov(_Keys(d.keys), M, d.group_ptr, L, E, int(width), scratch, ptr, keys)
        distance = L
    return Plan(predictor, int(width), distance, ptr, keys[: ptr[-1]].copy())


def lookahead_column(trace) -> np.ndarray:
    """The trace's look-ahead experts, token-major (tokens, layers, m) int16, -1 padded."""
    la = getattr(trace, "lookahead", None)
    if la is None:
        raise SimcacheError("--prefetch lookahead needs a trace with the 'lookahead' column "
                            "(capture it with simcache capture --lookahead)")
    la = np.asarray(la)
    if la.ndim != 2 or la.shape[0] != trace.num_rows or la.shape[1] < 1:
        raise SimcacheError(f"the lookahead column has shape {la.shape}, expected ({trace.num_rows}, m)")
    if la.size and (int(la.min()) < -1 or int(la.max()) >= trace.num_experts):
        raise SimcacheError(f"the lookahead column holds ids outside [-1, {trace.num_experts})")
    return np.ascontiguousarray(la.astype(np.int16).reshape(trace.num_tokens, trace.num_layers, -1))


_Keys = namedtuple("_Keys", ["keys"])  # what the admission learner reads of the cache state


def _learner(work, prior, decay_every, decay) -> Learner:
    L, E = work.trace.num_layers, work.trace.num_experts
    T = np.zeros((L, E, E)) if prior is None else np.array(prior, np.float64)
    if T.shape != (L, E, E):
        raise SimcacheError(f"prior has shape {T.shape}, the trace needs ({L}, {E}, {E})")
    pair_ptr, pair_prev, pair_cur = work.pairs
    return Learner(T, work.top1, pair_ptr, pair_prev, pair_cur, E, int(decay_every), float(decay),
                   1, 0.0, np.zeros(4 * E))


@jit
def _take(score, E, width, base, keys, n):
    """Append up to ``width`` experts of highest positive score (ties: lower id) as keys
    ``base + e``; zero what it reads. Returns the new count."""
    for _ in range(width):
        best = -1
        for e in range(E):
            if score[e] > 0.0 and (best < 0 or score[e] > score[best]):
                best = e
        if best < 0:
            break
        keys[n] = base + best
        n += 1
        score[best] = 0.0
    for e in range(E):
        score[e] = 0.0
    return n


@jit
def _oracle(group_ptr, dkeys, L, E, width, ptr, keys):
    n_groups = group_ptr.shape[0] - 1
    n = 0
    for g in range(n_groups):
        if g % L != L - 1 and g + 1 < n_groups:
            for i in range(group_ptr[g + 1], min(group_ptr[g + 2], group_ptr[g + 1] + width)):
                keys[n] = dkeys[i]  # (demand is in expert order)
                n += 1
        ptr[g + 1] = n


@jit
def _lookahead(step_ptr, step_tokens, la, L, E, width, scratch, ptr, keys):
    m = la.shape[2]
    upto = width if width < m else m
    n = 0
    for s in range(step_ptr.shape[0] - 1):
        for l in range(L):
            g = s * L + l
            if l < L - 1:
                best = scratch[E:]
                for e in range(E):
                    best[e] = m
                for j in range(step_ptr[s], step_ptr[s + 1]):
                    t = step_tokens[j]
                    for r in range(upto):
                        e = la[t, l, r]
                        if e >= 0:
                            scratch[e] += 1.0
                            if r < best[e]:
                                best[e] = r
                for e in range(E):  # votes, then the better best rank
                    if scratch[e] > 0.0:
                        scratch[e] += (m - best[e]) / (m + 1.0)
                n = _take(scratch, E, width, (l + 1) * E, keys, n)
            ptr[g + 1] = n


@jit
def _markov(S, M, group_ptr, L, E, width, scratch, ptr, keys):
    n_groups = group_ptr.shape[0] - 1
    n = 0
    for g in range(n_groups):
        s = g // L
        l = g - s * L
        lo, hi = group_ptr[g], group_ptr[g + 1]
        if hi > lo:  # (the simulator's learner skips empty groups too)
            markov_admission._count(S, M, s, l)
        if hi > lo and markov_admission._active_sum(S, M, l, lo, hi) > 0.0 and g + L < n_groups:
            for e in range(E):
                scratch[e] = M.work[e]
            n = _take(scratch, E, width, l * E, keys, n)
        ptr[g + 1] = n


# ---- inside the simulation kernel ----------------------------------------------------------
# The prefetch part of the loop (docs/prefetch.md "Where a prefetch goes"); its state is one
# tuple, declared here once. The loop itself does the per-access part (a hit on a prefetched
# expert, a late arrival, a demand copy) and calls buffered (only while buffers are taken) and
# advance (after a group ends). A prefetch asks the admission rule as a miss would: the loop's
# key array carries one spare access at its end, set to the prefetched key. (Hooks taking P
# written as inlined functions lost some of their stores under numba 0.62 - "variable ... is
# not in scope" - so the per-access lines sit in the loop and buffered is a real call.)

Prefetching = namedtuple(
    "Prefetching",
    [
        "T",  # the copy-engine timeline (simcache.timeline)
        "ptr",  # (groups + 1,) int64: the plan, Plan.ptr
        "keys",  # (requests,) int32: Plan.keys
        "distance",  # int: requested for group g + distance
        "unused",  # (keys,) bool: resident by prefetch, not demanded since
        "buf_key",  # (buffers,) int32: the key in prefetch buffer b, or -1
        "buf_target",  # (buffers,) int64: the group it waits for
        "live",  # (3,) int64: [buffers taken, key of the prefetch started last or -1, issued]
        "counts",  # (layers, 4) int64, see COUNTS
        "sched",  # (requests, 4) int64 when recording: [after group, key, slot, buffer]
        "group",  # (groups, 2) float64 when recording: [start, stall]
    ],
)
# per layer (of the prefetched expert): issued, used, accesses served from a buffer, evictions
COUNTS = ("prefetches", "prefetch_used", "prefetched", "evictions")
ISSUED, USED, FROM_BUFFER, EVICTED = range(len(COUNTS))


def new_prefetching(plan_: Plan, num_keys: int, num_layers: int, t_copy: float, n_groups: int,
                    record: bool) -> Prefetching:
    """The kernel's prefetch state for ``plan_`` (nothing queued or buffered)."""
    w, d = plan_.width, plan_.distance
    # buffers taken wait for groups g .. g + distance, at most ``width`` each
    n_buf = max(1, w * (d + 1))
    return Prefetching(
        T=new_timeline(num_keys, t_copy, (2 * d + 4) * w + 8),
        ptr=plan_.ptr, keys=plan_.keys, distance=int(d),
        unused=np.zeros(num_keys, np.bool_),
        buf_key=np.full(n_buf, -1, np.int32), buf_target=np.zeros(n_buf, np.int64),
        live=np.array([0, -1, 0], np.int64),
        counts=np.zeros((num_layers, len(COUNTS)), np.int64),
        sched=np.zeros((plan_.keys.shape[0] if record else 1, 4), np.int64),
        group=np.zeros((n_groups if record else 1, 2)),
    )


def no_prefetching(num_layers: int) -> Prefetching:
    """A placeholder of the same type for runs without prefetch."""
    return new_prefetching(Plan("none", 1, 1, np.zeros(2, np.int64), np.zeros(0, np.int32)), 1,
                           num_layers, 0.0, 1, False)


@kernel(inline="never")
def buffered(P, key, g, cost, l):
    """For a miss of group g: the prefetch buffer holding ``key`` for g (it is used), or -1."""
    for b in range(P.buf_key.shape[0]):
        if P.buf_key[b] == key and P.buf_target[b] == g:
            P.counts[l, USED] += 1
            P.counts[l, FROM_BUFFER] += 1
            if tl.waits(P.T, key):
                tl.use(P.T, key, cost)
            return b
    return -1


@kernel(inline="never")
def _waiting(P, key, g):
    if P.live[0] > 0:
        for b in range(P.buf_key.shape[0]):
            if P.buf_key[b] == key and P.buf_target[b] > g:
                return True
    return False


@kernel
def advance(P, S, M, evict, admit, per_layer, E, g, hi, stamp, record):
    """Group g has ended on the timeline: place the prefetches that start before its end (or
    drop them), then free the buffers whose group is over."""
    T = P.T
    spare = S.keys.shape[0] - 1
    j = tl.next_start(T)
    while j >= 0:
        key = T.q_key[j]
        if T.q_target[j] <= g or S.where[key] >= 0 or _waiting(P, key, g):
            tl.drop(T, j)
            j = tl.next_start(T)
            continue
        origin = T.q_origin[j]
        for r in range(P.ptr[origin], P.ptr[origin + 1]):  # what the same group will use
            S.pin[S.where[P.keys[r]]] = stamp  # (an absent key pins the spare entry)
        pool = key // E if per_layer else 0
        slot = -1
        S.keys[spare] = key
        if dispatch.admit(admit, S, M, pool, spare, spare + 1, stamp):
            if S.used[pool] < S.cap[pool]:
                slot = S.base[pool] + S.used[pool]
                S.used[pool] += 1
            else:
                slot = dispatch.victim(evict, S, M, pool, hi, stamp)
                if slot >= 0:
                    gone = S.slot_key[slot]
                    dispatch.on_evict(evict, S, M, slot, hi)
                    S.where[gone] = -1
                    S.evicted[gone] = True
                    P.unused[gone] = False
                    P.counts[key // E, EVICTED] += 1  # (at the layer of the newcomer)
        b = -1
        if slot >= 0:
            S.where[key] = slot
            S.slot_key[slot] = key
            S.pin[slot] = stamp
            dispatch.on_access(evict, S, M, slot, hi, True)
            P.unused[key] = True
        else:
            b = 0
            while P.buf_key[b] >= 0:
                b += 1
            P.buf_key[b] = key
            P.buf_target[b] = T.q_target[j]
            P.live[0] += 1
        P.counts[key // E, ISSUED] += 1
        P.live[1] = key
        if record:
            n = P.live[2]
            P.sched[n, 0] = g
            P.sched[n, 1] = key
            P.sched[n, 2] = slot - S.base[pool] if slot >= 0 else -1
            P.sched[n, 3] = b
        P.live[2] += 1
        tl.start(T, j)
        j = tl.next_start(T)
    if P.live[0] > 0:  # buffers whose group is over are freed (only now: the prefetches that
        for b in range(P.buf_key.shape[0]):  # start during it may not overwrite them)
            if P.buf_key[b] >= 0 and P.buf_target[b] <= g:
                P.buf_key[b] = -1
                P.live[0] -= 1
