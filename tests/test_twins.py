"""Every kernel against its slow twin (tests/naive.py), access by access."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import simcache
from simcache.policies import ADMISSION, EVICTION

from . import naive
from .conftest import random_trace, rule_inputs

PAIRS = list(itertools.product(EVICTION, ADMISSION))
# on the real trace (slow in the plain twin): every eviction rule with plain admission, and every
# admission rule with LRU and Belady eviction
FLAME_PAIRS = sorted({(e, "all") for e in EVICTION} | {(e, a) for a in ADMISSION for e in ("lru", "belady")})


def compare(trace, evict, admit, capacity, **kw):
    r = simcache.simulate(trace, None, capacity, evict=evict, admit=admit, record=True,
                          threshold=kw.pop("tau", 0.1), **kw, **rule_inputs(evict, trace))
    placed = naive.hot_set(naive.demand(trace), trace.num_layers, trace.num_experts, capacity,
                           kw.get("scope", "layer")) if evict in naive.PLACES else ()
    ref = naive.simulate(trace, evict, admit, capacity, tau=r.threshold if r.threshold is not None else 0.1,
                         placed=placed,
                         **{k: v for k, v in kw.items() if k in ("scope", "batch", "prefill", "prior",
                                                                 "horizon", "decay_every", "decay", "seed")})
    outcome, slot, victim = naive.as_arrays(ref)
    np.testing.assert_array_equal(r.decisions.outcome, outcome, err_msg="outcome")
    np.testing.assert_array_equal(r.decisions.slot, slot, err_msg="slot")
    np.testing.assert_array_equal(r.decisions.victim, victim, err_msg="victim")
    for name, values in ref["counters"].items():
        np.testing.assert_array_equal(r.per_layer[name], values, err_msg=name)
    return r


@pytest.mark.parametrize("evict,admit", PAIRS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_traces_per_layer(evict, admit, seed):
    t = random_trace(seed, prompt=2)
    for capacity in (1, 2, 4):
        compare(t, evict, admit, capacity, batch=1 + seed, prefill=("skip", "step")[seed % 2],
                decay_every=5, decay=0.9, tau=0.2, seed=seed)


@pytest.mark.parametrize("evict,admit", PAIRS)
def test_random_traces_global_scope(evict, admit):
    t = random_trace(7, layers=3, experts=5, top_k=2, requests=5)
    for capacity in (2, 5, 9):
        compare(t, evict, admit, capacity, scope="global", batch=2, decay_every=3, decay=0.95,
                tau=0.25)


@pytest.mark.parametrize("admit", ["markov", "markov-h"])
def test_markov_with_prior(admit):
    train = random_trace(11, experts=5, requests=6)
    test = random_trace(12, experts=5, requests=6)
    prior = simcache.transition_counts(train)
    compare(test, "lru", admit, 2, prior=prior, tau=0.3, horizon=3, batch=2)


@pytest.mark.parametrize("evict,admit", FLAME_PAIRS)
def test_flame_subset(flame, evict, admit):
    """Real routing: the 60 short requests of the FLAME sample (64 experts, top-6)."""
    sub = flame.select_requests(range(1, 61))
    for capacity, batch in ((12, 1), (24, 8)):
        compare(sub, evict, admit, capacity, batch=batch, tau=0.02)


def test_flame_lru_whole(flame):
    """The whole FLAME trace at batch 4, LRU and markov against the twins."""
    compare(flame, "lru", "all", 16, batch=4)
    compare(flame, "lru", "markov", 16, batch=4, tau="1/E")


@pytest.mark.parametrize("policy", ["belady", "belady-bypass"])
def test_flame_global_pool_uses_the_heap(flame, policy):
    """A global pool above belady.SCAN_MAX slots takes the heap path."""
    from simcache.policies.eviction.belady import SCAN_MAX

    sub = flame.select_requests(range(1, 61))
    capacity = SCAN_MAX + 72
    e, a = simcache.policies.PRESETS[policy]
    compare(sub, e, a, capacity, scope="global", batch=4)
