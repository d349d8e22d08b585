"""Markov admission with streaming bypass, as the mixtral-offloading fork implements it.

Per layer a count matrix T (E x E) learns, online and causally, from consecutive tokens of the
same sequence: T[top1(t), top1(t+1)] += 1, and every ``decay_every`` steps T *= ``decay``. At a
(step, layer) with active set A (the experts demanded now), s = sum over i in A of T[i, :] and
P(Return)(e) = s[e] / sum(s). A miss is admitted iff P(Return) >= tau; with no data yet (sum(s)
is 0) it is admitted. A refused miss is streamed past the cache (bypass).

The horizon variant scores the probability that e is the top-1 expert at least once within
``horizon`` steps, walking the row-normalised chain from s / sum(s).

Notes
-----
Rule from the Yuelinfeng/mixtral-offloading fork (``src/markov_expert_cache.py``), with two
corrections docs/design.md §4 describes: transitions pair tokens of the same sequence (the fork pairs
consecutive rows of a batch), and decay counts steps (the fork counts calls of any layer).
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies.registry import Admission, Field

LEARNER_KNOBS = ("threshold", "prior", "decay", "decay_every")
SCORE_STATE = {
    "score": Field(lambda z: z.keys, np.float64, doc="learner's score s[e] of each key (unnormalised)"),
    "total": Field(lambda z: z.layers, np.float64, doc="sum of s over the layer: P(Return) = score / total"),
    "nodata": Field(lambda z: z.layers, np.bool_, fill=True, doc="no data at the layer's last group"),
}


# No array views in these kernels: numba allocates for a view such as T[l], which costs more
# than the arithmetic here. Index (layer, a, b) directly.


@jit
def _count(S, M, s, l):
    T = M.T
    top1 = M.top1
    for p in range(M.pair_ptr[s], M.pair_ptr[s + 1]):
        a = top1[M.pair_prev[p], l]
        b = top1[M.pair_cur[p], l]
        if a >= 0 and b >= 0:  # -1: no record of that token at this layer (a gap)
            T[l, a, b] += 1.0
    every = M.decay_every
    if every > 0:
        if (s + 1) % every == 0:
            E = M.E
            for a in range(E):
                for b in range(E):
                    T[l, a, b] *= M.decay


@jit
def _active_sum(S, M, l, lo, hi):
    """s = sum of T[i, :] over the active experts, into M.work[:E]; returns sum(s)."""
    E = M.E
    T = M.T
    sv = M.work
    for e in range(E):
        sv[e] = 0.0
    base = l * E
    for j in range(lo, hi):
        a = S.keys[j] - base
        for e in range(E):
            sv[e] += T[l, a, e]
    total = 0.0
    for e in range(E):
        total += sv[e]
    return total


@jit
def learn(S, M, s, l, lo, hi):
    _count(S, M, s, l)
    total = _active_sum(S, M, l, lo, hi)
    S.nodata[l] = total <= 0.0
    if total > 0.0:  # with no data the last scores stay, as in the fork
        base = l * M.E
        for e in range(M.E):
            S.score[base + e] = M.work[e]
        S.total[l] = total


@jit
def p_return(S, M, key):
    """P(Return) of ``key``: its score over its layer's total (0 before any data)."""
    t = S.total[key // M.E]
    if t > 0.0:
        return S.score[key] / t
    return 0.0


@jit
def learn_horizon(S, M, s, l, lo, hi):
    _count(S, M, s, l)
    total = _active_sum(S, M, l, lo, hi)
    S.nodata[l] = total <= 0.0
    if total <= 0.0:
        return
    E = M.E
    T = M.T
    w = M.work  # [0, E): pi, the top-1 distribution; [E, 2E): P(not yet top-1);
    #             [2E, 3E): next pi; [3E, 4E): row sums of T
    for e in range(E):
        w[e] /= total
        w[E + e] = 1.0
        r = 0.0
        for b in range(E):
            r += T[l, e, b]
        w[3 * E + e] = r
    for step in range(M.horizon):
        for e in range(E):
            w[E + e] *= 1.0 - w[e]
        if step + 1 == M.horizon:
            break
        for b in range(E):
            w[2 * E + b] = 0.0
        for a in range(E):
            pa = w[a]
            if pa == 0.0:
                continue
            rows = w[3 * E + a]
            if rows > 0.0:
                f = pa / rows
                for b in range(E):
                    w[2 * E + b] += f * T[l, a, b]
            else:
                f = pa / E
                for b in range(E):
                    w[2 * E + b] += f
        for b in range(E):
            w[b] = w[2 * E + b]
    base = l * E
    for e in range(E):
        S.score[base + e] = 1.0 - w[E + e]
    S.total[l] = 1.0


@jit
def admit(S, M, pool, i, hi, stamp):
    key = S.keys[i]
    if S.nodata[key // M.E]:
        return True
    return p_return(S, M, key) >= M.tau


POLICIES = (
    Admission(
        "markov", admit=admit, learn=learn, state=SCORE_STATE, knobs=LEARNER_KNOBS,
        summary="P(Return) ≥ τ, or the learner has no data yet (the fork's rule, below)",
        notes="Yuelinfeng/mixtral-offloading (src/markov_expert_cache.py)",
    ),
    Admission(
        "markov-h", admit=admit, learn=learn_horizon, state=SCORE_STATE,
        knobs=LEARNER_KNOBS + ("horizon",),
        summary="P(expert is some step's top-1 within `--horizon` steps) ≥ τ",
        notes="simcache's horizon variant of the fork's rule",
    ),
)
