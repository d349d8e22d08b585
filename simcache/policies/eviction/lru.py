"""LRU: evict the least recently demanded resident.

A linked list per pool in recency order (head = least recent). Demanded experts move to the
tail; the victim is the first unpinned resident from the head (pinned hits of the current
step that have not been touched yet may still sit near the head, so they are skipped).
"""

from simcache._jit import kernel as jit
from simcache.policies._order import list_append, list_first_unpinned, list_remove


@jit
def on_access(S, slot, i, fill):
    if not fill:
        list_remove(S, slot)
    list_append(S, slot)


@jit
def on_evict(S, slot):
    list_remove(S, slot)


@jit
def victim(S, M, pool, stamp):
    return list_first_unpinned(S, pool, stamp, True)
