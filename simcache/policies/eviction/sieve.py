"""SIEVE: a FIFO queue with a visited bit and a hand that sweeps from the oldest resident
toward the newest, clearing visited bits, and evicts the first unvisited one.

Hits only set the bit (no reordering); new residents join at the newest end with the bit
clear; after an eviction the hand rests on the next newer resident and wraps to the oldest
when it passes the newest. Pinned residents are passed over untouched (their bit stays).

Notes
-----
Zhang et al., "SIEVE is Simpler than LRU", NSDI 2024; as libCacheSim implements it
(``libCacheSim/cache/eviction/Sieve.c``).
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._order import LIST_STATE, list_append, list_remove
from simcache.policies.registry import Eviction, Field


@jit
def on_access(S, M, slot, i, fill):
    if fill:
        list_append(S, slot)
    S.visited[slot] = not fill


@jit
def on_evict(S, M, slot, i):
    list_remove(S, slot)


@jit
def victim(S, M, pool, i, stamp):
    end = S.slot_key.shape[0] + pool
    slot = S.hand[pool]
    if slot < 0:
        slot = S.next[end]
    for _ in range(2 * S.used[pool] + 2):  # two sweeps clear every unpinned bit
        if slot == end:
            slot = S.next[end]
        if S.pin[slot] != stamp:
            if not S.visited[slot]:
                newer = S.next[slot]
                S.hand[pool] = newer if newer != end else -1
                return slot
            S.visited[slot] = False
        slot = S.next[slot]
    return -1


POLICY = Eviction(
    "sieve", victim=victim, on_access=on_access, on_evict=on_evict,
    state={**LIST_STATE,
           "visited": Field(lambda z: z.slots, np.bool_, doc="sieve: demanded again since the fill"),
           "hand": Field(lambda z: z.pools, np.int32, fill=-1, doc="sieve: where the hand rests (-1: the oldest)")},
    summary="first unvisited resident from the hand (oldest → newest, clearing visited bits)",
    notes="Zhang et al., NSDI 2024 (SIEVE); libCacheSim's Sieve.c",
)
