"""Prefetch predictors (DESIGN §12): which experts to copy before their demand is known.

A predictor turns a :class:`~simcache.workload.Workload` into a *plan*: for every (step, layer)
group g, up to ``width`` keys in priority order, requested when g's demand is known (at g's
start, behind g's demand copies) for the group ``g + distance``:

``oracle``
    The true demand of the next layer of the same step (distance 1; none from the last layer),
    most tokens first: the bound a next-layer predictor can reach.
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

from simcache._jit import jit
from simcache.errors import SimcacheError
from simcache.policies.admission import markov as markov_admission
from simcache.state import Learner
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
        _oracle(d.group_ptr, d.keys, d.tokens, L, E, int(width), scratch, ptr, keys)
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
def _oracle(group_ptr, dkeys, tokens, L, E, width, scratch, ptr, keys):
    n_groups = group_ptr.shape[0] - 1
    n = 0
    for g in range(n_groups):
        if g % L != L - 1 and g + 1 < n_groups:
            for i in range(group_ptr[g + 1], group_ptr[g + 2]):
                scratch[dkeys[i] % E] = tokens[i]
            n = _take(scratch, E, width, (g % L + 1) * E, keys, n)
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
