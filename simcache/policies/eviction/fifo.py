"""FIFO: evict the resident loaded earliest; hits do not change the order."""

from simcache._jit import kernel as jit
from simcache.policies._order import LIST_STATE, list_append, list_first_unpinned, list_remove
from simcache.policies.registry import Eviction


@jit
def on_access(S, M, slot, i, fill):
    if fill:
        list_append(S, slot)


@jit
def on_evict(S, M, slot, i):
    list_remove(S, slot)


@jit
def victim(S, M, pool, i, stamp):
    return list_first_unpinned(S, pool, stamp, True)


POLICY = Eviction(
    "fifo", victim=victim, on_access=on_access, on_evict=on_evict, state=LIST_STATE,
    summary="loaded earliest (hits do not reorder)", notes="the classic rule",
)
