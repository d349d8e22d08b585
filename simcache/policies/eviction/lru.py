"""LRU: evict the least recently demanded resident.

A linked list per pool in recency order; demanded experts move to the tail, so the pinned
ones form a suffix and the victim is the head (or none, when the head is pinned too).
"""

from simcache._jit import kernel as jit
from simcache.policies._order import list_append, list_remove


@jit
def on_access(S, slot, i, fill):
    list_remove(S, slot)  # a no-op for a fresh fill (its node points at itself)
    list_append(S, slot)


@jit
def on_evict(S, slot):
    list_remove(S, slot)


@jit
def victim(S, M, pool, stamp):
    n = S.slot_key.shape[0]
    head = S.next[n + pool]
    if head >= n:
        return -1  # empty
    if S.pin[head] == stamp:
        return -1  # every resident pinned (pinned ones are the most recent)
    return head
