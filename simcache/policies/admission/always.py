"""Admit every miss (plain demand paging)."""

from simcache._jit import kernel as jit
from simcache.policies.registry import Admission


@jit
def admit(S, M, pool, i, hi, stamp):
    return True


POLICY = Admission("all", admit=admit, summary="always", notes="demand paging")
