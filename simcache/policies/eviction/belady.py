"""Belady (MIN): evict the unpinned resident whose next demand is farthest away.

Notes
-----
L. A. Belady, "A study of replacement algorithms for a virtual-storage computer", IBM
Systems Journal 5(2), 1966. Next use comes precomputed (:func:`simcache.workload.next_use`);
residents never demanded again rank farthest, the least recently used of them first. A max-heap
per pool keeps the victim search at O(log C).
"""

from simcache._jit import kernel as jit
from simcache.policies._order import heap_fix, heap_max_unpinned, heap_push, heap_remove


@jit
def on_access(S, slot, i, fill):
    S.prio[slot] = S.nu[slot]
    if fill:
        heap_push(S, slot)
    else:
        heap_fix(S, slot)


@jit
def on_evict(S, slot):
    heap_remove(S, slot)


@jit
def victim(S, M, pool, stamp):
    return heap_max_unpinned(S, pool, stamp)
