"""LFRU: a privileged partition in LRU order (half the pool) above an unprivileged one evicted
by LFU. Experts enter the unprivileged partition; a hit there promotes the expert to the
privileged one, whose least recently used resident is demoted when it overflows.
The victim is the unprivileged resident demanded least often since its fill (ties → least
recently used), or the privileged LRU when none is unpinned.

Notes
-----
Bilal & Kang, "A cache management scheme for efficient content eviction and replication in
cache networks", IEEE Access 5, 2017 (LFRU). llama.cpp has no LFRU expert cache that we could
find (its MoE offload is static placement: ``--cpu-moe`` / ``-ot``), so this is the published
definition; the unprivileged partition ranks by exact in-cache frequency.
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._order import RECENCY_STATE, note_access
from simcache.policies._queues import first_unpinned, push, unlink
from simcache.policies.registry import Eviction, Field


@jit
def _demote_overflow(S, pool):
    """Demotion only changes partition, so pinned residents may be demoted too."""
    end = S.slot_key.shape[0] + pool
    while S.lf_size[pool] > S.cap[pool] // 2:
        slot = S.lf_next[end]
        unlink(S.lf_prev, S.lf_next, slot)
        S.lf_priv[slot] = False
        S.lf_size[pool] -= 1


@jit
def on_access(S, M, slot, i, fill):
    note_access(S, M, slot, i, fill)
    if fill:
        S.lf_priv[slot] = False
        return
    pool = S.slot_pool[slot]
    if S.lf_priv[slot]:
        unlink(S.lf_prev, S.lf_next, slot)
    else:
        S.lf_priv[slot] = True
        S.lf_size[pool] += 1
    push(S.lf_prev, S.lf_next, S.slot_key.shape[0] + pool, slot)
    _demote_overflow(S, pool)


@jit
def on_evict(S, M, slot, i):
    if S.lf_priv[slot]:
        unlink(S.lf_prev, S.lf_next, slot)
        S.lf_priv[slot] = False
        S.lf_size[S.slot_pool[slot]] -= 1


@jit
def victim(S, M, pool, i, stamp):
    best = -1
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] == stamp or S.lf_priv[slot]:
            continue
        if best < 0 or S.freq[slot] < S.freq[best] or (S.freq[slot] == S.freq[best] and S.last[slot] < S.last[best]):
            best = slot
    if best < 0:
        best = first_unpinned(S, S.lf_next, S.slot_key.shape[0] + pool, stamp)
    return best


POLICY = Eviction(
    "lfru", victim=victim, on_access=on_access, on_evict=on_evict,
    state={**RECENCY_STATE,
           "lf_prev": Field(lambda z: z.slots + z.pools, np.int32, doc="lfru: privileged LRU list, previous",
                            init=lambda z: np.arange(z.slots + z.pools)),
           "lf_next": Field(lambda z: z.slots + z.pools, np.int32, doc="lfru: privileged LRU list, next",
                            init=lambda z: np.arange(z.slots + z.pools)),
           "lf_priv": Field(lambda z: z.slots, np.bool_, doc="lfru: the slot is in the privileged partition"),
           "lf_size": Field(lambda z: z.pools, np.int64, doc="lfru: privileged residents per pool")},
    summary="LFU among the unprivileged (entered once), else the privileged partition's LRU",
    notes="Bilal & Kang, IEEE Access 5, 2017 (LFRU); no llama.cpp LFRU found",
)
