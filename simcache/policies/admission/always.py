"""Admit every miss (plain demand paging)."""

from simcache._jit import kernel as jit


@jit
def admit(S, M, pool, i, hi, stamp):
    return True
