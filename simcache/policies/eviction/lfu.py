"""LFU: evict the resident demanded least often since it was loaded; ties go to the least
recently used. Frequency is in-cache frequency (reset on fill), as in libCacheSim's LFU."""

from simcache._jit import kernel as jit
from simcache.policies._order import RECENCY_STATE, noop_evict, note_access, scan_min_unpinned
from simcache.policies.registry import Eviction


@jit
def victim(S, M, pool, i, stamp):
    return scan_min_unpinned(S, pool, stamp, S.freq)


POLICY = Eviction(
    "lfu", victim=victim, on_access=note_access, on_evict=noop_evict, state=RECENCY_STATE,
    summary="fewest demands since it was loaded; ties → least recently used", notes="in-cache LFU as libCacheSim defines it",
)
