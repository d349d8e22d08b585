"""LIFO: evict the resident loaded most recently (a baseline that keeps the oldest)."""

from simcache._jit import kernel as jit
from simcache.policies._order import LIST_STATE, list_first_unpinned
from simcache.policies.eviction.fifo import on_access, on_evict  # same order as FIFO
from simcache.policies.registry import Eviction


@jit
def victim(S, M, pool, i, stamp):
    return list_first_unpinned(S, pool, stamp, False)


POLICY = Eviction(
    "lifo", victim=victim, on_access=on_access, on_evict=on_evict, state=LIST_STATE,
    summary="loaded latest", notes="a baseline that keeps the oldest residents",
)
