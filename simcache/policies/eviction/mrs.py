"""MRS (HybriMoE's score-based caching): every step each expert's score becomes
S = α·TopP(s) + (1 − α)·S with α = 0.5, where TopP(s) is the router probability the step gave
it (0 if no token chose it); evict the resident with the lowest score, ties to the least
recently used. Scores survive eviction.

The router probabilities come from the trace's gate weights (:func:`simcache.policies._steps.gate_of_access`:
the chosen top-k weights, averaged over the step's tokens; 1/k per choice without weights).
Decay is applied lazily and exactly (α = 0.5 halves a score: ``ldexp``); in a global pool a
layer not yet run this step has had one decay less.

Notes
-----
Zhong et al., "HybriMoE: hybrid CPU-GPU scheduling and cache management for efficient MoE
inference" (DAC 2025), minus-recent-score (MRS) replacement. The trace keeps only the top-k
probabilities, so TopP is taken over those.
"""

import math

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._order import RECENCY_STATE, noop_evict, note_access
from simcache.policies._steps import GATE_STATE, STEP_STATE
from simcache.policies.registry import Eviction, Field


@jit
def on_access(S, M, slot, i, fill):
    note_access(S, M, slot, i, fill)
    key = S.slot_key[slot]
    s = S.step_of[i]
    S.mrs_score[key] = 0.5 * S.gate[i] + math.ldexp(S.mrs_score[key], int(S.mrs_step[key] - s))
    S.mrs_step[key] = s


@jit
def victim(S, M, pool, i, stamp):
    s = S.step_of[i]
    here = S.keys[i] // M.E
    best = -1
    low = 0.0
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] == stamp:
            continue
        key = S.slot_key[slot]
        now = s if key // M.E <= here else s - 1  # steps whose update this key has had
        v = math.ldexp(S.mrs_score[key], int(S.mrs_step[key] - now))
        if best < 0 or v < low or (v == low and S.last[slot] < S.last[best]):
            best = slot
            low = v
    return best


POLICY = Eviction(
    "mrs", victim=victim, on_access=on_access, on_evict=noop_evict,
    state={**RECENCY_STATE, **STEP_STATE, **GATE_STATE,
           "mrs_score": Field(lambda z: z.keys, np.float64, doc="mrs: score S of each key"),
           "mrs_step": Field(lambda z: z.keys, np.int64, doc="mrs: step of the score's last update")},
    summary="lowest score S = ½·TopP + ½·S (router probability, decayed per step); ties → least recently used",
    notes="Zhong et al., HybriMoE (DAC 2025), MRS",
)
