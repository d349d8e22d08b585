"""Belady and Belady-with-bypass reach the optimum, checked by exhaustive search on tiny
traces (one pool; several experts per step; steps may demand more experts than the cache
holds)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import simcache

from . import naive
from .strategies import traces


def pool_groups(trace, batch):
    """The demand sets of layer 0, in order (per-layer pools are independent)."""
    steps = naive.schedule(trace, batch, "skip")
    return [[k for k, _ in acc] for s, l, acc in naive.accesses(trace, steps) if l == 0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(max_layers=1, max_experts=5, max_k=3, max_requests=3, max_len=6, prompts=False),
       st.data())
def test_belady_bypass_reaches_the_exhaustive_optimum(trace, data):
    batch = data.draw(st.integers(1, 3))
    capacity = data.draw(st.integers(1, trace.num_experts))
    groups = pool_groups(trace, batch)
    r = simcache.simulate(trace, "belady-bypass", capacity, batch=batch)
    assert r.hits == naive.optimal_hits(groups, capacity, bypass=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(max_layers=1, max_experts=5, max_k=3, max_requests=3, max_len=6, prompts=False),
       st.data())
def test_belady_reaches_the_demand_paging_optimum(trace, data):
    batch = data.draw(st.integers(1, 3))
    capacity = data.draw(st.integers(1, trace.num_experts))
    groups = pool_groups(trace, batch)
    r = simcache.simulate(trace, "belady", capacity, batch=batch)
    assert r.hits == naive.optimal_hits(groups, capacity, bypass=False)


def test_set_aware_oracle_beats_one_at_a_time():
    """The case the set-aware rule exists for: two misses of one step, one slot to give."""
    import numpy as np

    # step 0: experts {0, 1} fill both slots; step 1: {2, 3} (3 is needed sooner than 2);
    # then 1, 3, 2 in later steps. One at a time in expert order would keep 2.
    seq = [[0, 1], [2, 3], [1, 0], [3, 1], [2, 3]]
    t = simcache.Trace.from_arrays(np.array(seq), request=[0] * 5, position=range(5),
                                   layer=[0] * 5, num_experts=4)
    groups = [set(g) for g in seq]
    assert simcache.simulate(t, "belady-bypass", 2).hits == naive.optimal_hits(groups, 2)


def test_ties_inside_a_step_are_broken_by_the_use_after():
    """One slot, every step wants two experts. After step 0, experts 0 and 1 are both next
    needed in step 1: a tie, since a step's second expert cannot be swapped in while its first
    is pinned. Plain next-use order (0 comes first inside step 1) would keep 0 and score 2 hits;
    ordering ties by the use after keeps 1, which every later step wants, and reaches the
    optimum of 4."""
    import numpy as np

    seq = [[0, 1], [0, 1], [1, 2], [0, 1], [1, 2]]
    t = simcache.Trace.from_arrays(np.array(seq), request=[0, 1, 2, 2, 2], position=[0, 0, 0, 1, 2],
                                   layer=[0] * 5, num_experts=3)
    r = simcache.simulate(t, "belady-bypass", 1, record=True)
    assert naive.optimal_hits([set(g) for g in seq], 1) == r.hits == 4
    assert r.decisions.outcome[:2].tolist() == [2, 1]  # 0 streamed past, 1 kept
