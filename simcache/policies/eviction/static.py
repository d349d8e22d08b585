"""Static placement: the C most-demanded experts, resident from the start, never evicted.

Before the first step the cache holds, per layer pool, the C experts of that layer routed to
most often in *training* data (global scope: the C most-demanded (layer, expert) keys of the
one pool); ties go to the lower key. ``victim`` never gives a slot up, so a miss that is
copied streams past the cache (a forced bypass: nothing is evictable) and, with ``--miss
cpu``, is computed on the host. The demand counts come from a separate split or a prior,
never from the scored requests (:func:`simcache.demand_counts`).
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._order import noop_access, noop_evict
from simcache.policies.registry import Eviction


@jit
def victim(S, M, pool, i, stamp):
    return -1


def hot_set(demand: np.ndarray, capacity: int, per_layer: bool) -> list[np.ndarray]:
    """Keys (layer x E + expert) to place, per pool, most demanded first (ties: lower key)."""
    L, E = demand.shape
    if per_layer:
        return [l * E + np.argsort(-demand[l], kind="stable")[:capacity] for l in range(L)]
    return [np.argsort(-demand.reshape(-1), kind="stable")[:capacity]]


def place(S, demand, per_layer):
    """Fill every pool with its hot set, in rank order (slot base + rank)."""
    for p, keys in enumerate(hot_set(demand, int(S.cap[0]), per_layer)):
        for rank, key in enumerate(keys):
            slot = S.base[p] + rank
            S.where[key] = slot
            S.slot_key[slot] = key
            S.nu[slot] = 0  # until first demanded, ranks as needed next (oracle admission)
        S.used[p] = len(keys)


POLICY = Eviction(
    "static", victim=victim, on_access=noop_access, on_evict=noop_evict, place=place,
    summary="none: the C most-demanded experts of training data stay resident (static placement)",
    notes="llama.cpp `-ot` / `--n-cpu-moe`; Fiddler (Kamahori et al., 2024) keeps its "
          "popular experts on the GPU",
    knobs=("train_demand",),
)
