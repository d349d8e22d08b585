"""FIFO: evict the resident loaded earliest; hits do not change the order."""

from simcache._jit import kernel as jit
from simcache.policies._order import list_append, list_first_unpinned, list_remove


@jit
def on_access(S, slot, i, fill):
    if fill:
        list_append(S, slot)


@jit
def on_evict(S, slot):
    list_remove(S, slot)


@jit
def victim(S, M, pool, stamp):
    return list_first_unpinned(S, pool, stamp, True)
