"""The loop's dispatch from a policy code to its hooks, generated from the registry.

A code reaches the kernel as the length of a tuple (:func:`tag`), which is part of the tuple's
numba type; each hook below is a plain function (it runs as is under ``NUMBA_DISABLE_JIT=1``)
with a numba ``overload`` that picks the registered implementation while the loop is being
typed, and inlines it. So each policy pair compiles to its own loop with no branch on the
code, and a code with no registered policy is a typing error, not a silent fallback.
"""

from __future__ import annotations

from numba.core.errors import TypingError
from numba.extending import overload

from simcache.policies import ADMISSION, EVICTION, LEARNERS

_EVICTION = tuple(EVICTION.values())
_ADMISSION = tuple(ADMISSION.values())


def tag(code: int) -> tuple:
    """A compile-time constant for numba: ``code`` as the length of a tuple. (numba's own
    ``literally`` re-enters the compiler on every call; a tuple's length is part of its type.)"""
    return (0,) * (code + 1)


def _pick(rules, what, t):
    code = getattr(t, "count", -1) - 1
    if not 0 <= code < len(rules):
        raise TypingError(f"no {what} is registered under code {code}")
    return rules[code]


def victim(t, S, M, pool, i, stamp):
    return _EVICTION[len(t) - 1].victim(S, M, pool, i, stamp)


def on_access(t, S, M, slot, i, fill):
    _EVICTION[len(t) - 1].on_access(S, M, slot, i, fill)


def on_evict(t, S, M, slot, i):
    _EVICTION[len(t) - 1].on_evict(S, M, slot, i)


def admit(t, S, M, pool, i, hi, stamp):
    return _ADMISSION[len(t) - 1].admit(S, M, pool, i, hi, stamp)


def learn(t, S, M, s, l, lo, hi):
    fn = LEARNERS[len(t) - 1]
    if fn is not None:
        fn(S, M, s, l, lo, hi)


@overload(victim, inline="always")
def _victim(t, S, M, pool, i, stamp):
    fn = _pick(_EVICTION, "eviction rule", t).victim

    def impl(t, S, M, pool, i, stamp):
        return fn(S, M, pool, i, stamp)

    return impl


@overload(on_access, inline="always")
def _on_access(t, S, M, slot, i, fill):
    fn = _pick(_EVICTION, "eviction rule", t).on_access

    def impl(t, S, M, slot, i, fill):
        fn(S, M, slot, i, fill)

    return impl


@overload(on_evict, inline="always")
def _on_evict(t, S, M, slot, i):
    fn = _pick(_EVICTION, "eviction rule", t).on_evict

    def impl(t, S, M, slot, i):
        fn(S, M, slot, i)

    return impl


@overload(admit, inline="always")
def _admit(t, S, M, pool, i, hi, stamp):
    fn = _pick(_ADMISSION, "admission rule", t).admit

    def impl(t, S, M, pool, i, hi, stamp):
        return fn(S, M, pool, i, hi, stamp)

    return impl


@overload(learn, inline="always")
def _learn(t, S, M, s, l, lo, hi):
    fn = _pick(LEARNERS, "learner", t)
    if fn is None:
        def impl(t, S, M, s, l, lo, hi):
            pass
    else:
        def impl(t, S, M, s, l, lo, hi):
            fn(S, M, s, l, lo, hi)

    return impl
