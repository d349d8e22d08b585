"""Order structures policies keep over their pool's slots: a doubly linked list and a
binary max-heap, both laid out in :class:`~simcache.state.CacheState` arrays, and the last
access / frequency of each slot. Each structure declares its state fields once, here; the
policies that use one name it in their ``state``."""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies.registry import Field

LIST_STATE = {
    # circular doubly linked list per pool; the sentinel of pool p is node slots + p, and
    # every list starts empty (the sentinel points at itself)
    "prev": Field(lambda z: z.slots + z.pools, np.int32, doc="list: previous node",
                  init=lambda z: np.arange(z.slots + z.pools)),
    "next": Field(lambda z: z.slots + z.pools, np.int32, doc="list: next node",
                  init=lambda z: np.arange(z.slots + z.pools)),
}
HEAP_STATE = {
    "prio": Field(lambda z: z.slots, np.int64, doc="heap priority (largest is evicted first)"),
    "heap": Field(lambda z: z.slots, np.int32, doc="per-pool binary heaps laid out like the slots"),
    "hpos": Field(lambda z: z.slots, np.int32, doc="position of a slot in its heap"),
    "hsize": Field(lambda z: z.pools, np.int64, doc="heap sizes"),
    "scratch": Field(lambda z: z.slots + 1, np.int64, doc="work space (heap search stack)"),
}
RECENCY_STATE = {
    "last": Field(lambda z: z.slots, np.int64, doc="access index of the last hit or fill"),
    "freq": Field(lambda z: z.slots, np.int64, doc="accesses since the fill"),
}

# ---- circular doubly linked list per pool, with a sentinel node (head = oldest) -----------


@jit
def list_append(S, slot):
    end = S.slot_key.shape[0] + S.slot_pool[slot]
    last = S.prev[end]
    S.next[last] = slot
    S.prev[slot] = last
    S.next[slot] = end
    S.prev[end] = slot


@jit
def list_remove(S, slot):
    p = S.prev[slot]
    n = S.next[slot]
    S.next[p] = n
    S.prev[n] = p


@jit
def list_first_unpinned(S, pool, stamp, from_head):
    """First slot from the head (or tail) that the current group has not pinned, or -1."""
    end = S.slot_key.shape[0] + pool
    # one array walked, chosen once: numba keeps this loop free of reference counting only
    # without per-step branches between arrays, or short-circuit tests on array reads
    links = S.next
    if not from_head:
        links = S.prev
    slot = links[end]
    while slot != end:
        if S.pin[slot] != stamp:
            return slot
        slot = links[slot]
    return -1


# ---- binary max-heap per pool, keyed by S.prio ---------------------------------------------


@jit
def _sift_up(S, b, i):
    h = S.heap
    x = h[b + i]
    px = S.prio[x]
    while i > 0:
        p = (i - 1) >> 1
        y = h[b + p]
        if S.prio[y] >= px:
            break
        h[b + i] = y
        S.hpos[y] = i
        i = p
    h[b + i] = x
    S.hpos[x] = i
    return i


@jit
def _sift_down(S, b, i, n):
    h = S.heap
    x = h[b + i]
    px = S.prio[x]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n:
            if S.prio[h[b + c + 1]] > S.prio[h[b + c]]:
                c += 1
        y = h[b + c]
        if S.prio[y] <= px:
            break
        h[b + i] = y
        S.hpos[y] = i
        i = c
    h[b + i] = x
    S.hpos[x] = i


@jit
def heap_push(S, slot):
    pool = S.slot_pool[slot]
    b = S.base[pool]
    n = S.hsize[pool]
    S.heap[b + n] = slot
    S.hsize[pool] = n + 1
    _sift_up(S, b, n)


@jit
def heap_fix(S, slot):
    """Restore heap order after ``S.prio[slot]`` changed."""
    pool = S.slot_pool[slot]
    b = S.base[pool]
    i = _sift_up(S, b, S.hpos[slot])
    _sift_down(S, b, i, S.hsize[pool])


@jit
def heap_remove(S, slot):
    pool = S.slot_pool[slot]
    b = S.base[pool]
    i = S.hpos[slot]
    n = S.hsize[pool] - 1
    S.hsize[pool] = n
    if i != n:
        last = S.heap[b + n]
        S.heap[b + i] = last
        S.hpos[last] = i
        i = _sift_up(S, b, i)
        _sift_down(S, b, i, n)


@jit
def heap_max_unpinned(S, pool, stamp):
    """The unpinned slot of largest priority, or -1.

    The answer's ancestors are all pinned, so a search that descends only through pinned
    nodes finds it after visiting at most 2 * pinned + 1 nodes.
    """
    b = S.base[pool]
    n = S.hsize[pool]
    if n == 0:
        return -1
    stack = S.scratch
    stack[0] = 0
    sp = 1
    best = -1
    while sp > 0:
        sp -= 1
        i = stack[sp]
        x = S.heap[b + i]
        if best >= 0:
            if S.prio[x] <= S.prio[best]:
                continue
        if S.pin[x] != stamp:
            best = x
            continue
        c = 2 * i + 1
        if c < n:
            stack[sp] = c
            sp += 1
        if c + 1 < n:
            stack[sp] = c + 1
            sp += 1
    return best


@jit
def scan_min_unpinned(S, pool, stamp, primary, keyed=False):
    """The unpinned slot with the smallest ``primary`` value, ties by least recent access;
    ``primary`` is indexed by slot, or with ``keyed`` by the slot's key."""
    best = -1
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] == stamp:
            continue
        if best < 0:
            best = slot
            continue
        a = primary[S.slot_key[slot]] if keyed else primary[slot]
        c = primary[S.slot_key[best]] if keyed else primary[best]
        if a < c:
            best = slot
        elif a == c:
            if S.last[slot] < S.last[best]:
                best = slot
    return best


@jit
def note_access(S, M, slot, i, fill):
    """Last access and in-cache frequency, for rules that rank by them."""
    S.last[slot] = i
    if fill:
        S.freq[slot] = 1
    else:
        S.freq[slot] += 1


@jit
def noop_access(S, M, slot, i, fill):
    pass


@jit
def noop_evict(S, M, slot, i):
    pass
