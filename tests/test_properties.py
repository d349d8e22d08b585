"""Invariants that must hold on any trace (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import simcache
from simcache.policies import ADMISSION, EVICTION, PRESETS

from .conftest import rule_inputs
from .strategies import traces

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def workload_args(data, trace):
    batch = data.draw(st.integers(1, 3))
    prefill = data.draw(st.sampled_from(["skip", "step"]))
    scope = data.draw(st.sampled_from(["layer", "global"]))
    size = trace.num_experts if scope == "layer" else trace.num_experts * trace.num_layers
    capacity = data.draw(st.integers(1, size))
    return batch, prefill, scope, capacity


def has_accesses(trace, prefill):
    return prefill == "step" or bool((trace.phase == 1).any())


@SETTINGS
@given(traces(), st.data(), st.sampled_from(sorted(EVICTION)), st.sampled_from(sorted(ADMISSION)))
def test_counters_add_up_and_occupancy_bounded(trace, data, evict, admit):
    batch, prefill, scope, capacity = workload_args(data, trace)
    assume(has_accesses(trace, prefill))
    r = simcache.simulate(trace, None, capacity, evict=evict, admit=admit, batch=batch,
                          prefill=prefill, scope=scope, record=True, threshold=0.2,
                          **rule_inputs(evict, trace))
    assert r.hits + r.fills + r.bypasses + r.forced_bypasses == r.accesses
    pl = r.per_layer
    assert (pl["hits"] + pl["fills"] + pl["bypasses"] + pl["forced_bypasses"] == pl["accesses"]).all()
    assert r.evictions <= r.fills and r.reloads <= r.fills
    # occupancy, replayed from the decisions: fills add a resident, evictions remove one
    d = r.decisions
    E = trace.num_experts
    from simcache.workload import Workload

    keys = Workload(trace, batch, prefill).demand.keys
    pool = (keys // E) if scope == "layer" else np.zeros_like(keys)
    resident = [set() for _ in range(trace.num_layers if scope == "layer" else 1)]
    if EVICTION[evict].place is not None:  # residents placed before the first step
        from simcache.state import new_state

        S = new_state(keys=keys, future=np.zeros(0, np.int64), num_layers=trace.num_layers, num_experts=E,
                      pool_caps=[capacity] * len(resident), rules=(EVICTION[evict],))
        EVICTION[evict].place(S, rule_inputs(evict, trace)["train_demand"], scope == "layer")
        for slot in np.flatnonzero(S.slot_key >= 0):
            resident[S.slot_pool[slot]].add(S.slot_key[slot])
    for i in range(keys.size):
        p = pool[i]
        if d.outcome[i] == 0:
            assert keys[i] in resident[p], "hit on a non-resident"
        elif d.outcome[i] == 1:
            if d.victim[i] >= 0:
                assert d.victim[i] in resident[p] and d.victim[i] != keys[i]
                resident[p].discard(d.victim[i])
            assert keys[i] not in resident[p]
            resident[p].add(keys[i])
            assert len(resident[p]) <= capacity
            assert 0 <= d.slot[i] < capacity
        else:
            assert keys[i] not in resident[p]


@SETTINGS
@given(traces(), st.data())
def test_nothing_beats_belady_with_bypass(trace, data):
    """Belady-with-bypass needs the fewest loads of all pairs, Belady the fewest of all
    demand-paging (admit-all) rules."""
    batch, prefill, scope, capacity = workload_args(data, trace)
    assume(has_accesses(trace, prefill))
    work = simcache.Workload(trace, batch, prefill)
    best = simcache.simulate(work, "belady-bypass", capacity, scope=scope)
    # rules that start cold: a placed cache (static) starts warm, so Belady does not bound it
    cold = [e for e in EVICTION if EVICTION[e].place is None]
    for evict in cold:
        for admit in ADMISSION:
            r = simcache.simulate(work, None, capacity, evict=evict, admit=admit, scope=scope,
                                  threshold=0.2, **rule_inputs(evict, trace))
            assert r.loads >= best.loads, (evict, admit)
    demand_min = simcache.simulate(work, "belady", capacity, scope=scope)
    for evict in cold:
        r = simcache.simulate(work, None, capacity, evict=evict, admit="all", scope=scope,
                              **rule_inputs(evict, trace))
        assert r.loads >= demand_min.loads, evict


@SETTINGS
@given(traces(prompts=False), st.data())
def test_lru_hits_never_fall_as_capacity_grows(trace, data):
    scope = data.draw(st.sampled_from(["layer", "global"]))
    size = trace.num_experts if scope == "layer" else trace.num_experts * trace.num_layers
    work = simcache.Workload(trace, 1)
    hits = [simcache.simulate(work, "lru", c, scope=scope).hits for c in range(trace.top_k, size + 1)]
    assert all(a <= b for a, b in zip(hits, hits[1:])), hits


@SETTINGS
@given(traces(), st.data(), st.sampled_from(sorted(PRESETS)))
def test_same_seed_same_result(trace, data, policy):
    batch, prefill, scope, capacity = workload_args(data, trace)
    assume(has_accesses(trace, prefill))
    seed = data.draw(st.integers(0, 2**31))
    extra = rule_inputs(PRESETS[policy][0], trace)
    a = simcache.simulate(trace, policy, capacity, batch=batch, prefill=prefill, scope=scope,
                          seed=seed, record=True, **extra)
    b = simcache.simulate(trace, policy, capacity, batch=batch, prefill=prefill, scope=scope,
                          seed=seed, record=True, **extra)
    np.testing.assert_array_equal(a.decisions.outcome, b.decisions.outcome)
    np.testing.assert_array_equal(a.decisions.victim, b.decisions.victim)
    assert a.to_dict() | {"elapsed": 0} == b.to_dict() | {"elapsed": 0}


def test_random_eviction_depends_on_seed():
    from .conftest import random_trace

    t = random_trace(3, experts=8, requests=8, length=(20, 30))
    runs = {simcache.simulate(t, "random", 3, seed=s, record=True).decisions.victim.tobytes()
            for s in range(4)}
    assert len(runs) > 1


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_full_capacity_hits_every_repeat(capacity):
    """With room for every expert, only first touches miss."""
    from .conftest import random_trace

    t = random_trace(5, experts=3, top_k=1)
    r = simcache.simulate(t, "lru", 3)
    assert r.fills == t.num_layers * 3 - int(sum(
        1 for l in range(t.num_layers) for e in range(3) if not (t.experts[t.layer == l] == e).any()))
    assert r.evictions == 0
