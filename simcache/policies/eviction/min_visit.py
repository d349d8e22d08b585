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
from simcache.policies._order import RECENCY_STATE, noop_evict, note_access, scan_min_unpinned
from simcache.policies.registry import Eviction, Field


@jit
def on_access(S, M, slot, i, fill):
    note_access(S, M, slot, i, fill)
    S.visits[S.slot_key[slot]] += 1


@jit
def victim(S, M, pool, i, stamp):
    return scan_min_unpinned(S, pool, stamp, S.visits, True)


POLICY = Eviction(
    "min-visit", victim=victim, on_access=on_access, on_evict=noop_evict,
    state={**RECENCY_STATE, "visits": Field(lambda z: z.keys, np.int64, doc="min-visit: demands of each key so far")},
    summary="fewest demands since the run began (kept across evictions); ties → least recently used",
    notes="Xue et al., MoE-Infinity (arXiv 2401.14361), EAM visit counts",
)
