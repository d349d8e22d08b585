"""Numba options, in one place.

Every kernel in simcache is compiled through :func:`jit`, so caching, bounds checking
and fast-math are decided here once. Fast-math stays off: the Markov admission rule
compares floating-point probabilities against a threshold, and the slow reference twins
in the tests must reach bit-identical decisions.

The simulation loop and the policies compile through :func:`kernel`: without numba's runtime
(NRT), and inlined into their caller. Policy functions take the whole cache state; a real call
with NRT on pays two atomic reference-count updates per array of that state (measured: ~300 ns
per call, against ~8 ns inlined). Policies are selected by a code, through numba overloads
that pick the implementation while the loop is typed (:mod:`simcache.policies._dispatch`),
rather than passed as first-class functions: numba's on-disk cache cannot re-save an index
holding function-typed signatures from an earlier process ("underlying object has vanished"),
so that design broke the second process to compile a new policy pair.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numba
from numba.core import caching

OPTIONS = {"cache": True, "nogil": True, "fastmath": False, "boundscheck": False}
# The simulation loop and the policies: no NRT (they allocate nothing, so no reference
# counting), and inlined into their caller at numba's IR level.
KERNEL = {**OPTIONS, "_nrt": False, "inline": "always", "error_model": "numpy"}


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


# ---- cache invalidation that sees the whole package ----------------------------------------
# numba stamps a cached function with a hash of its own source file only. The simulation loop
# inlines policy functions from other files, so an edit to a policy would leave a stale
# compiled loop in the cache. For functions defined in simcache, the stamp below covers every
# source file of the package instead.

_PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def package_stamp() -> bytes:
    """sha256 over the names and contents of every kernel source of the simcache package: the
    .py files that compile through this module (they name ``simcache._jit``), so that editing
    the CLI, the replay harness or the docs does not recompile the loop."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        text = path.read_bytes()
        if path.name != "_jit.py" and b"simcache._jit" not in text:
            continue
        h.update(path.relative_to(_PACKAGE).as_posix().encode())
        h.update(text)
    return h.digest()


class _PackageStamp:
    def get_source_stamp(self):
        return package_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        if not Path(py_file).resolve().is_relative_to(_PACKAGE):
            return None
        return super().from_function(py_func, py_file)


def _numba(name):  # numba >= 0.61 dropped the leading underscore of these names
    return getattr(caching, name, None) or getattr(caching, "_" + name)


class _UserProvidedLocator(_PackageStamp, _numba("UserProvidedCacheLocator")):
    pass


class _InTreeLocator(_PackageStamp, _numba("InTreeCacheLocator")):
    pass


class _UserWideLocator(_PackageStamp, _numba("UserWideCacheLocator")):
    pass


_LOCATORS = _numba("CacheImpl")._locator_classes
if not any(cls.__name__ == "_InTreeLocator" for cls in _LOCATORS):
    _LOCATORS[:0] = [_UserProvidedLocator, _InTreeLocator, _UserWideLocator]
