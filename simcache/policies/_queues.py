"""Queues for rules that keep several orders per pool (S3-FIFO, 2Q, ARC, LFRU): circular
doubly linked lists over explicit link arrays, so one pair of arrays can hold several lists
(each with its own sentinel node), and ghost lists of keys that are no longer resident.

Data queues link slots: ``queue_state(prefix, n)`` gives ``n`` lists per pool, the sentinel of
list q of pool p being node ``slots + n * p + q``. Ghost queues link keys the same way
(``ghost_state``), sentinel ``keys + n * p + q``. Head = oldest (or least recently used).
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies.registry import Field


def queue_state(prefix: str, n: int, what: str) -> dict:
    """Link arrays for ``n`` slot queues per pool, which queue each slot is in, and sizes."""
    return {
        f"{prefix}_prev": Field(lambda z: z.slots + n * z.pools, np.int32, doc=f"{what}: previous node",
                                init=lambda z: np.arange(z.slots + n * z.pools)),
        f"{prefix}_next": Field(lambda z: z.slots + n * z.pools, np.int32, doc=f"{what}: next node",
                                init=lambda z: np.arange(z.slots + n * z.pools)),
        f"{prefix}_in": Field(lambda z: z.slots, np.int8, doc=f"{what}: queue of the slot"),
        f"{prefix}_size": Field(lambda z: n * z.pools, np.int64, doc=f"{what}: residents per queue"),
    }


def ghost_state(prefix: str, n: int, what: str) -> dict:
    """Link arrays for ``n`` ghost queues of keys per pool, which one a key is in (-1: none),
    and sizes."""
    return {
        f"{prefix}_prev": Field(lambda z: z.keys + n * z.pools, np.int32, doc=f"{what}: previous key",
                                init=lambda z: np.arange(z.keys + n * z.pools)),
        f"{prefix}_next": Field(lambda z: z.keys + n * z.pools, np.int32, doc=f"{what}: next key",
                                init=lambda z: np.arange(z.keys + n * z.pools)),
        f"{prefix}_in": Field(lambda z: z.keys, np.int8, fill=-1, doc=f"{what}: ghost queue of the key, -1 if none"),
        f"{prefix}_size": Field(lambda z: n * z.pools, np.int64, doc=f"{what}: keys per ghost queue"),
    }


@jit
def push(prev, nxt, end, node):
    """Append ``node`` at the tail (newest end) of the list whose sentinel is ``end``."""
    last = prev[end]
    nxt[last] = node
    prev[node] = last
    nxt[node] = end
    prev[end] = node


@jit
def unlink(prev, nxt, node):
    p = prev[node]
    n = nxt[node]
    nxt[p] = n
    prev[n] = p


@jit
def first_unpinned(S, nxt, end, stamp):
    """The oldest slot of the list not pinned by the current group, or -1."""
    slot = nxt[end]
    while slot != end:
        if S.pin[slot] != stamp:
            return slot
        slot = nxt[slot]
    return -1


@jit
def any_unpinned(S, pool, stamp):
    """Whether the pool has a resident the current group has not pinned (a rule changes
    nothing on a miss that finds every resident pinned)."""
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] != stamp:
            return True
    return False


@jit
def ghost_add(G_prev, G_next, G_in, G_size, keys, pool, n, q, key, limit):
    """Remember ``key`` at the tail of ghost queue ``q`` of ``pool``; drop the oldest while the
    queue holds more than ``limit`` keys."""
    if limit <= 0:
        return
    j = n * pool + q
    push(G_prev, G_next, keys + j, key)
    G_in[key] = q
    G_size[j] += 1
    while G_size[j] > limit:
        old = G_next[keys + j]
        unlink(G_prev, G_next, old)
        G_in[old] = -1
        G_size[j] -= 1


@jit
def ghost_drop(G_prev, G_next, G_in, G_size, pool, n, key):
    """Forget ``key`` if a ghost queue holds it; returns the queue it was in, or -1."""
    q = G_in[key]
    if q >= 0:
        unlink(G_prev, G_next, key)
        G_in[key] = -1
        G_size[n * pool + q] -= 1
    return q


@jit
def ghost_oldest_drop(G_prev, G_next, G_in, G_size, keys, pool, n, q):
    """Forget the oldest key of ghost queue ``q`` of ``pool`` (if any)."""
    j = n * pool + q
    old = G_next[keys + j]
    if old != keys + j:
        unlink(G_prev, G_next, old)
        G_in[old] = -1
        G_size[j] -= 1
