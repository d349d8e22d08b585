"""2Q: new experts enter a FIFO ``A1in`` (25 % of the pool); a key evicted from it is
remembered in a ghost FIFO ``A1out`` (50 % of the pool); a miss found in the ghost enters the
LRU ``Am``. The victim is A1in's oldest while A1in is over its share, else Am's least
recently used.

Notes
-----
Johnson & Shasha, "2Q: a low overhead high performance buffer management replacement
algorithm", VLDB 1994; as libCacheSim implements it (``libCacheSim/cache/eviction/TwoQ.c``:
Ain 25 %, Aout 50 %). Choices: A1in holds at least one slot (libCacheSim admits nothing under 4
slots); when the chosen queue has no unpinned resident the other queue gives one up.
"""

from simcache._jit import kernel as jit
from simcache.policies._queues import any_unpinned, first_unpinned, ghost_add, ghost_drop, ghost_state, push, queue_state, unlink
from simcache.policies.registry import Eviction, Field

import numpy as np

AIN, AM = 0, 1


@jit
def on_access(S, M, slot, i, fill):
    pool = S.slot_pool[slot]
    end = S.slot_key.shape[0] + 2 * pool
    if not fill:
        if S.tq_in[slot] == AM:  # A1in is a FIFO: hits there change nothing
            unlink(S.tq_prev, S.tq_next, slot)
            push(S.tq_prev, S.tq_next, end + AM, slot)
        return
    key = S.slot_key[slot]
    ghost = S.tq_ghost_hit[pool] == key
    S.tq_ghost_hit[pool] = -1
    if ghost_drop(S.tg_prev, S.tg_next, S.tg_in, S.tg_size, pool, 1, key) >= 0:
        ghost = True
    q = AM if ghost else AIN
    push(S.tq_prev, S.tq_next, end + q, slot)
    S.tq_in[slot] = q
    S.tq_size[2 * pool + q] += 1


@jit
def on_evict(S, M, slot, i):
    pool = S.slot_pool[slot]
    unlink(S.tq_prev, S.tq_next, slot)
    S.tq_size[2 * pool + S.tq_in[slot]] -= 1
    if S.tq_in[slot] == AIN:
        ghost_add(S.tg_prev, S.tg_next, S.tg_in, S.tg_size, S.where.shape[0], pool, 1, 0,
                  S.slot_key[slot], S.cap[pool] // 2)


@jit
def victim(S, M, pool, i, stamp):
    if not any_unpinned(S, pool, stamp):
        return -1
    key = S.keys[i]
    S.tq_ghost_hit[pool] = -1
    if ghost_drop(S.tg_prev, S.tg_next, S.tg_in, S.tg_size, pool, 1, key) >= 0:
        S.tq_ghost_hit[pool] = key
    end = S.slot_key.shape[0] + 2 * pool
    first, second = AM, AIN
    if S.tq_size[2 * pool + AIN] > max(1, S.cap[pool] // 4):
        first, second = AIN, AM
    slot = first_unpinned(S, S.tq_next, end + first, stamp)
    if slot < 0:
        slot = first_unpinned(S, S.tq_next, end + second, stamp)
    return slot


POLICY = Eviction(
    "2q", victim=victim, on_access=on_access, on_evict=on_evict,
    state={**queue_state("tq", 2, "2q A1in / Am queues"), **ghost_state("tg", 1, "2q A1out ghost"),
           "tq_ghost_hit": Field(lambda z: z.pools, np.int64, fill=-1, doc="2q: key of the miss found in A1out")},
    summary="A1in's oldest while A1in is over 25 %, else Am's least recently used; A1out ghost → Am",
    notes="Johnson & Shasha, VLDB 1994 (2Q); libCacheSim's TwoQ.c",
)
