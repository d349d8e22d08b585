"""ARC: two LRU lists of residents, T1 (demanded once since the fill) and T2 (demanded again),
two ghost LRU lists of keys, B1 and B2, and a target size p for T1 that ghost hits adapt.

A miss found in B1 raises p by max(|B2| / |B1|, 1), one found in B2 lowers it by
max(|B1| / |B2|, 1) (p is a real number, as in libCacheSim); either enters T2, any other miss T1. REPLACE gives up T1's least recently
used (into B1) when |T1| > p, or |T1| = p and the miss was in B2, else T2's (into B2). A miss
in no ghost first trims the ghosts: if |T1| + |B1| reaches the pool size, B1's oldest key
goes (or, with B1 empty, T1's least recently used leaves outright); else once all four lists
hold twice the pool size, B2's oldest.

Notes
-----
Megiddo & Modha, "ARC: a self-tuning, low overhead replacement cache", FAST 2003; as
libCacheSim implements it (``libCacheSim/cache/eviction/ARC.c``). Choice for pinning: when
the list REPLACE picks has no unpinned resident, the other list gives one up (into its own
ghost); a miss with every resident pinned changes nothing.
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._queues import first_unpinned, ghost_add, ghost_drop, ghost_oldest_drop, ghost_state, push, queue_state, unlink
from simcache.policies.registry import Eviction, Field

T1, T2 = 0, 1
B1, B2 = 0, 1


@jit
def on_access(S, M, slot, i, fill):
    pool = S.slot_pool[slot]
    end = S.slot_key.shape[0] + 2 * pool
    q = T2
    if fill:
        if S.arc_ghost_hit[pool] != S.slot_key[slot]:
            q = T1
        S.arc_ghost_hit[pool] = -1
    else:
        unlink(S.arcq_prev, S.arcq_next, slot)
        S.arcq_size[2 * pool + S.arcq_in[slot]] -= 1
    push(S.arcq_prev, S.arcq_next, end + q, slot)
    S.arcq_in[slot] = q
    S.arcq_size[2 * pool + q] += 1


@jit
def on_evict(S, M, slot, i):
    unlink(S.arcq_prev, S.arcq_next, slot)
    S.arcq_size[2 * S.slot_pool[slot] + S.arcq_in[slot]] -= 1


@jit
def _replace(S, pool, stamp, in_b2, u1, u2):
    t1 = S.arcq_size[2 * pool + T1]
    slot, ghost = u2, B2
    if t1 > 0 and (t1 > S.arc_p[pool] or (t1 == S.arc_p[pool] and in_b2)):
        slot, ghost = u1, B1
    if slot < 0:  # that list is all pinned: the other gives one up
        if ghost == B1:
            slot, ghost = u2, B2
        else:
            slot, ghost = u1, B1
    ghost_add(S.arcg_prev, S.arcg_next, S.arcg_in, S.arcg_size, S.where.shape[0], pool, 2, ghost,
              S.slot_key[slot], 2 * S.cap[pool])
    return slot


@jit
def victim(S, M, pool, i, stamp):
    end = S.slot_key.shape[0] + 2 * pool
    u1 = first_unpinned(S, S.arcq_next, end + T1, stamp)
    u2 = first_unpinned(S, S.arcq_next, end + T2, stamp)
    if u1 < 0 and u2 < 0:
        return -1
    key = S.keys[i]
    c = S.cap[pool]
    b1 = S.arcg_size[2 * pool + B1]
    b2 = S.arcg_size[2 * pool + B2]
    q = ghost_drop(S.arcg_prev, S.arcg_next, S.arcg_in, S.arcg_size, pool, 2, key)
    S.arc_ghost_hit[pool] = key if q >= 0 else -1
    if q == B1:
        S.arc_p[pool] = min(S.arc_p[pool] + max(b2 / b1, 1.0), c)
        return _replace(S, pool, stamp, False, u1, u2)
    if q == B2:
        S.arc_p[pool] = max(S.arc_p[pool] - max(b1 / b2, 1.0), 0.0)
        return _replace(S, pool, stamp, True, u1, u2)
    t1 = S.arcq_size[2 * pool + T1]
    t2 = S.arcq_size[2 * pool + T2]
    if t1 + b1 + 1 > c:
        if b1 > 0:
            ghost_oldest_drop(S.arcg_prev, S.arcg_next, S.arcg_in, S.arcg_size, S.where.shape[0], pool, 2, B1)
            return _replace(S, pool, stamp, False, u1, u2)
        return u1  # T1 is the whole pool and B1 is empty: T1's LRU leaves, remembered nowhere
    if t1 + t2 + b1 + b2 >= 2 * c:
        ghost_oldest_drop(S.arcg_prev, S.arcg_next, S.arcg_in, S.arcg_size, S.where.shape[0], pool, 2, B2)
    return _replace(S, pool, stamp, False, u1, u2)


POLICY = Eviction(
    "arc", victim=victim, on_access=on_access, on_evict=on_evict,
    state={**queue_state("arcq", 2, "arc T1 / T2 lists"), **ghost_state("arcg", 2, "arc B1 / B2 ghosts"),
           "arc_p": Field(lambda z: z.pools, np.float64, doc="arc: target size of T1"),
           "arc_ghost_hit": Field(lambda z: z.pools, np.int64, fill=-1, doc="arc: key of the miss found in a ghost")},
    summary="adaptive: T1's or T2's least recently used by the target p that ghost hits tune (below)",
    notes="Megiddo & Modha, FAST 2003 (ARC); libCacheSim's ARC.c",
)
