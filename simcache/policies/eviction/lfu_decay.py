"""LFU with exponential decay: each expert's demand count halves every ``HALF_LIFE`` steps
(counted in whole periods, so the arithmetic is exact); evict the resident with the smallest
decayed count, ties to the least recently used. Counts survive eviction.

Notes
-----
The aging LFU of the caching literature (e.g. Arlitt et al., "Evaluating content management
techniques for Web proxy caches", 2000: LFU with dynamic aging); half-life 16 steps is
simcache's choice.
"""

import math

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._order import RECENCY_STATE, noop_evict, note_access
from simcache.policies._steps import STEP_STATE
from simcache.policies.registry import Eviction, Field

HALF_LIFE = 16  # steps


@jit
def on_access(S, M, slot, i, fill):
    note_access(S, M, slot, i, fill)
    key = S.slot_key[slot]
    now = S.step_of[i] // HALF_LIFE
    S.dcount[key] = math.ldexp(S.dcount[key], int(S.dperiod[key] - now)) + 1.0
    S.dperiod[key] = now


@jit
def victim(S, M, pool, i, stamp):
    now = S.step_of[i] // HALF_LIFE
    best = -1
    low = 0.0
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] == stamp:
            continue
        key = S.slot_key[slot]
        v = math.ldexp(S.dcount[key], int(S.dperiod[key] - now))
        if best < 0 or v < low or (v == low and S.last[slot] < S.last[best]):
            best = slot
            low = v
    return best


POLICY = Eviction(
    "lfu-decay", victim=victim, on_access=on_access, on_evict=noop_evict,
    state={**RECENCY_STATE, **STEP_STATE,
           "dcount": Field(lambda z: z.keys, np.float64, doc="lfu-decay: decayed demand count"),
           "dperiod": Field(lambda z: z.keys, np.int64, doc="lfu-decay: half-life period of the count")},
    summary=f"smallest demand count halved every {HALF_LIFE} steps; ties → least recently used",
    notes="aging LFU (Arlitt et al., 2000); half-life is simcache's choice",
)
