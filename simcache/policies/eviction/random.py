"""Random: evict a uniformly chosen unpinned resident (splitmix64, seeded).

The r-th unpinned slot in slot order, r = rng() mod (unpinned count), so a plain Python twin
with the same generator reaches the same choices.
"""

import numpy as np

from simcache._jit import kernel as jit
from simcache.policies._order import noop_access, noop_evict
from simcache.policies.registry import Eviction, Field

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


@jit
def splitmix64(state):
    """Advance ``state[0]`` and return the next 64-bit output (Steele et al., 2014)."""
    state[0] += _GAMMA
    z = state[0]
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@jit
def victim(S, M, pool, i, stamp):
    lo = S.base[pool]
    hi = lo + S.used[pool]
    free = 0
    for slot in range(lo, hi):
        if S.pin[slot] != stamp:
            free += 1
    if free == 0:
        return -1
    r = np.int64(splitmix64(S.rng) % np.uint64(free))
    for slot in range(lo, hi):
        if S.pin[slot] != stamp:
            if r == 0:
                return slot
            r -= 1
    return -1


def _seeded(z):
    return np.array([np.uint64(z.seed) ^ _GAMMA], np.uint64)


POLICY = Eviction(
    "random", victim=victim, on_access=noop_access, on_evict=noop_evict,
    state={"rng": Field(lambda z: 1, np.uint64, doc="splitmix64 state", init=_seeded)},
    summary="uniform, from a seeded splitmix64 generator (`--seed`)", notes="the classic baseline",
)
