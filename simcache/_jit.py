"""Numba options, in one place.

Every kernel in simcache is compiled through :func:`jit`, so caching, bounds checking
and fast-math are decided here once. Fast-math stays off: the Markov admission rule
compares floating-point probabilities against a threshold, and the slow reference twins
in the tests must reach bit-identical decisions.

Helpers that policies call take the whole cache state; they are inlined at numba's IR level
(``jit(inline="always")``) because a real call passes every array of the state and pays two
atomic reference-count updates for each (measured: ~300 ns per call against ~8 ns inlined).
"""

from __future__ import annotations

import numba

OPTIONS = {"cache": True, "nogil": True, "fastmath": False, "boundscheck": False}
KERNEL = {**OPTIONS, "_nrt": False}


def jit(fn=None, **overrides):
    """``numba.njit`` with simcache's options; usable bare or with overrides."""
    options = {**OPTIONS, **overrides}
    if fn is None:
        return lambda f: numba.njit(**options)(f)
    return numba.njit(**options)(fn)


def kernel(fn=None, **overrides):
    """jit for the simulation loop and policies: no NRT (no allocation, no refcounting)."""
    options = {**KERNEL, **overrides}
    if fn is None:
        return lambda f: numba.njit(**options)(f)
    return numba.njit(**options)(fn)
