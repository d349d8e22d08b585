"""Numba options, in one place.

Every kernel in simcache is compiled through :func:`jit`, so caching, bounds checking
and fast-math are decided here once. Fast-math stays off: the Markov admission rule
compares floating-point probabilities against a threshold, and the slow reference twins
in the tests must reach bit-identical decisions.

The simulation loop and the policies compile through :func:`kernel`: without numba's runtime
(NRT), and inlined into their caller. Policy functions take the whole cache state; a real call
with NRT on pays two atomic reference-count updates per array of that state (measured: ~300 ns
per call, against ~8 ns inlined). Policies are selected by a code and a static if-chain
(:mod:`simcache.policies._dispatch`) rather than passed as first-class functions: numba's
on-disk cache cannot re-save an index holding function-typed signatures from an earlier
process ("underlying object has vanished"), so that design broke the second process to
compile a new policy pair.
"""

from __future__ import annotations

import numba

OPTIONS = {"cache": True, "nogil": True, "fastmath": False, "boundscheck": False}
# The simulation loop and the policies: no NRT (they allocate nothing, so no reference
# counting), and inlined into their caller at numba's IR level.
KERNEL = {**OPTIONS, "_nrt": False, "inline": "always"}


def jit(fn=None, **overrides):
    """``numba.njit`` with simcache's options; usable bare or with overrides."""
    options = {**OPTIONS, **overrides}
    if fn is None:
        return lambda f: numba.njit(**options)(f)
    return numba.njit(**options)(fn)


def kernel(fn=None, **overrides):
    """jit for the simulation loop and policies: no NRT, inlined into callers."""
    options = {**KERNEL, **overrides}
    if fn is None:
        return lambda f: numba.njit(**options)(f)
    return numba.njit(**options)(fn)
