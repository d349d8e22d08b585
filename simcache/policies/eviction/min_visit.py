"""Min-visit: evict the resident whose expert has been demanded the fewest times since the
simulation began (counts survive eviction), ties to the least recently used.

Notes
-----
Xue et al., "MoE-Infinity: offloading-efficient MoE model serving" (arXiv 2401.14361): its
expert cache evicts by the visit counts of the Expert Activation Matrix. MoE-Infinity counts
the current request's activations (and matches them against past requests); simcache counts
every access since the start of the run, which is that count at batch 1 summed over requests.
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._order import RECENCY_STATE, noop_evict, note_access
from simcache.policies.registry import Eviction, Field


@jit
def on_access(S, M, slot, i, fill):
    note_access(S, M, slot, i, fill)
    S.visits[S.slot_key[slot]] += 1


@jit
def victim(S, M, pool, i, stamp):
    best = -1
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] == stamp:
            continue
        if best < 0:
            best = slot
            continue
        a = S.visits[S.slot_key[slot]]
        c = S.visits[S.slot_key[best]]
        if a < c or (a == c and S.last[slot] < S.last[best]):
            best = slot
    return best


POLICY = Eviction(
    "min-visit", victim=victim, on_access=on_access, on_evict=noop_evict,
    state={**RECENCY_STATE, "visits": Field(lambda z: z.keys, np.int64, doc="min-visit: demands of each key so far")},
    summary="fewest demands since the run began (kept across evictions); ties → least recently used",
    notes="Xue et al., MoE-Infinity (arXiv 2401.14361), EAM visit counts",
)
