"""LIFO: evict the resident loaded most recently (a baseline that keeps the oldest)."""

from simcache._jit import kernel as jit
from simcache.policies._order import list_first_unpinned
from simcache.policies.eviction.fifo import on_access, on_evict  # noqa: F401  same order


@jit
def victim(S, M, pool, stamp):
    return list_first_unpinned(S, pool, stamp, False)
