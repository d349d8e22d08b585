"""S3-FIFO: a small FIFO (10 % of the pool) that new experts enter, a main FIFO with a
2-bit clock, and a ghost FIFO of keys recently evicted from the small queue.

A miss whose key is in the ghost enters main, else small (main while small is full and
nothing has been evicted yet). Evicting from small (when main is within its size and small is
not empty): the oldest resident demanded at least twice since its fill moves to main
(frequency reset), the first other one leaves and its key joins the ghost. Evicting from main:
the oldest resident with frequency f ≥ 1 is reinserted with min(f, 3) − 1, the first with 0
leaves. Hits add 1 to the frequency.

Notes
-----
Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023; as libCacheSim
implements it (``libCacheSim/cache/eviction/S3FIFO.c``: small 10 %, ghost 90 % of the pool,
move-to-main threshold 2). Choices where the pool is small or pinned: the small queue holds
at least one slot (libCacheSim refuses pools under 20 slots); pinned residents are passed over
in place; the incoming key leaves the ghost when its eviction is decided, as in libCacheSim's
lookup.
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._queues import any_unpinned, first_unpinned, ghost_add, ghost_drop, ghost_state, push, queue_state, unlink
from simcache.policies.registry import Eviction, Field

SMALL, MAIN = 0, 1


@jit
def small_cap(S, pool):
    return max(1, S.cap[pool] // 10)


@jit
def _move(S, slot, pool, q):
    unlink(S.s3q_prev, S.s3q_next, slot)
    S.s3q_size[2 * pool + S.s3q_in[slot]] -= 1
    push(S.s3q_prev, S.s3q_next, S.slot_key.shape[0] + 2 * pool + q, slot)
    S.s3q_in[slot] = q
    S.s3q_size[2 * pool + q] += 1


@jit
def on_access(S, M, slot, i, fill):
    if not fill:
        S.s3_freq[slot] += 1
        return
    pool = S.slot_pool[slot]
    key = S.slot_key[slot]
    ghost = S.s3_ghost_hit[pool] == key
    S.s3_ghost_hit[pool] = -1
    if ghost_drop(S.s3g_prev, S.s3g_next, S.s3g_in, S.s3g_size, pool, 1, key) >= 0:
        ghost = True
    q = SMALL
    if ghost or (not S.s3_evicted[pool] and S.s3q_size[2 * pool] >= small_cap(S, pool)):
        q = MAIN
    push(S.s3q_prev, S.s3q_next, S.slot_key.shape[0] + 2 * pool + q, slot)
    S.s3q_in[slot] = q
    S.s3q_size[2 * pool + q] += 1
    S.s3_freq[slot] = 0


@jit
def on_evict(S, M, slot, i):
    pool = S.slot_pool[slot]
    unlink(S.s3q_prev, S.s3q_next, slot)
    S.s3q_size[2 * pool + S.s3q_in[slot]] -= 1
    if S.s3q_in[slot] == SMALL:
        ghost_add(S.s3g_prev, S.s3g_next, S.s3g_in, S.s3g_size, S.where.shape[0], pool, 1, 0,
                  S.slot_key[slot], (9 * S.cap[pool]) // 10)


@jit
def _evict_small(S, pool, stamp):
    end = S.slot_key.shape[0] + 2 * pool + SMALL
    slot = S.s3q_next[end]
    for _ in range(S.s3q_size[2 * pool + SMALL]):
        newer = S.s3q_next[slot]
        if S.pin[slot] != stamp:
            if S.s3_freq[slot] < 2:
                return slot
            _move(S, slot, pool, MAIN)
            S.s3_freq[slot] = 0
        slot = newer
    return -1


@jit
def _evict_main(S, pool, stamp):
    end = S.slot_key.shape[0] + 2 * pool + MAIN
    seen = True
    while seen:  # each pass lowers every unpinned frequency, so this ends
        seen = False
        slot = S.s3q_next[end]
        for _ in range(S.s3q_size[2 * pool + MAIN]):
            newer = S.s3q_next[slot]
            if S.pin[slot] != stamp:
                seen = True
                f = S.s3_freq[slot]
                if f == 0:
                    return slot
                _move(S, slot, pool, MAIN)
                S.s3_freq[slot] = min(f, 3) - 1
            slot = newer
    return -1


@jit
def victim(S, M, pool, i, stamp):
    if not any_unpinned(S, pool, stamp):
        return -1
    key = S.keys[i]
    S.s3_ghost_hit[pool] = -1
    if ghost_drop(S.s3g_prev, S.s3g_next, S.s3g_in, S.s3g_size, pool, 1, key) >= 0:
        S.s3_ghost_hit[pool] = key
    S.s3_evicted[pool] = True
    if S.s3q_size[2 * pool + MAIN] > S.cap[pool] - small_cap(S, pool) or S.s3q_size[2 * pool + SMALL] == 0:
        slot = _evict_main(S, pool, stamp)
        if slot < 0:
            slot = _evict_small(S, pool, stamp)
    else:
        slot = _evict_small(S, pool, stamp)
    if slot < 0:  # every unpinned resident of small has moved to main
        slot = _evict_main(S, pool, stamp)
    return slot


POLICY = Eviction(
    "s3fifo", victim=victim, on_access=on_access, on_evict=on_evict,
    state={**queue_state("s3q", 2, "s3fifo small / main queues"),
           **ghost_state("s3g", 1, "s3fifo ghost"),
           "s3_freq": Field(lambda z: z.slots, np.int64, doc="s3fifo: demands since the fill or move"),
           "s3_evicted": Field(lambda z: z.pools, np.bool_, doc="s3fifo: the pool has evicted once"),
           "s3_ghost_hit": Field(lambda z: z.pools, np.int64, fill=-1, doc="s3fifo: key of the miss found in the ghost")},
    summary="small FIFO → main FIFO with a 2-bit clock, ghost of small's evictions (below)",
    notes="Yang et al., SOSP 2023 (S3-FIFO); libCacheSim's S3FIFO.c",
)
