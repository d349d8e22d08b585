"""Oracle admission: admit a miss only if it is among the experts worth keeping.

With Belady eviction this is Belady-with-bypass, the optimum for unit-size paging with
bypass: the hit-rate ceiling of any admission rule.

Notes
-----
The rule of docs/design.md §4 — admit e iff its next use comes before the farthest next use among
the residents — judged one miss at a time, can keep the wrong one of two misses of the same
(step, layer). So the rule here is set-aware: the slots open to this group's misses are the
free ones plus the unpinned residents; e is admitted iff fewer of those residents and of the
group's not yet served misses are needed before e than there are such slots. For a group with
one miss it is exactly the rule of docs/design.md §4. Experts never demanded again tie with each other, and a
tie keeps the resident. The test suite checks the result against an exhaustive search.
"""

from simcache._jit import kernel as jit
from simcache.policies.registry import Admission


@jit
def admit(S, M, pool, i, hi, stamp):
    n = S.keys.shape[0]
    me = min(S.future[i], n)
    room = S.cap[pool] - S.used[pool]
    nearer = 0
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] == stamp:
            continue
        room += 1
        if min(S.nu[slot], n) <= me:
            nearer += 1
    for j in range(i + 1, hi):
        if S.where[S.keys[j]] < 0:
            if min(S.future[j], n) < me:
                nearer += 1
    return nearer < room


POLICY = Admission(
    "oracle", admit=admit, needs_future=True, summary="it is among the experts worth keeping (offline; below)",
    notes="with belady eviction: Belady-with-bypass, the optimum of paging with bypass",
)
