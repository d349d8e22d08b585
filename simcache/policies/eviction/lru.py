"""LRU: evict the least recently demanded resident.

A linked list per pool in recency order (head = least recent). Demanded experts move to the
tail; the victim is the first unpinned resident from the head (pinned hits of the current
step that have not been touched yet may still sit near the head, so they are skipped).
"""

from simcache._jit import kernel as jit
from simcache.policies._order import LIST_STATE, list_append, list_first_unpinned, list_remove
from simcache.policies.registry import Eviction


@jit
def on_access(S, M, slot, i, fill):
    if not fill:
        list_remove(S, slot)
    list_append(S, slot)


@jit
def on_evict(S, M, slot, i):
    list_remove(S, slot)


@jit
def victim(S, M, pool, i, stamp):
    return list_first_unpinned(S, pool, stamp, True)


POLICY = Eviction(
    "lru", victim=victim, on_access=on_access, on_evict=on_evict, state=LIST_STATE,
    summary="least recently demanded",
    notes="the classic rule; mixtral-offloading's per-layer expert cache (Eliseev & Mazur, 2023)",
)
