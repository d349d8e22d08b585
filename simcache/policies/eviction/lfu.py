"""LFU: evict the resident demanded least often since it was loaded; ties go to the least
recently used. Frequency is in-cache frequency (reset on fill), as in libCacheSim's LFU."""

from simcache._jit import kernel as jit
from simcache.policies._order import noop_evict, note_access, scan_min_unpinned

on_access = note_access
on_evict = noop_evict


@jit
def victim(S, M, pool, stamp):
    return scan_min_unpinned(S, pool, stamp, S.freq)
