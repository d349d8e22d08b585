"""The registry, the dispatch chains and the public simulate() contract."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import simcache
from simcache.policies import ADMISSION, EVICTION, PRESETS, _dispatch, resolve

from . import naive
from .conftest import random_trace, rule_inputs


def test_registry_is_consistent_and_dispatched():
    assert [e.code for e in EVICTION.values()] == list(range(len(EVICTION)))
    assert [a.code for a in ADMISSION.values()] == list(range(len(ADMISSION)))
    for rule in (*EVICTION.values(), *ADMISSION.values()):
        assert rule.summary and rule.notes, rule.name
    # every registered rule has a slow twin in tests/naive.py
    assert set(naive.EVICTION) == set(EVICTION)
    assert set(naive.ADMISSION) == set(ADMISSION)
    # every preset names registered rules
    assert all(e in EVICTION and a in ADMISSION for e, a in PRESETS.values())


@pytest.mark.skipif(__import__("numba").config.DISABLE_JIT, reason="typing happens only when numba compiles")
def test_unknown_code_is_a_compile_time_error():
    """No fallback: a code with no registered rule fails while the loop is typed."""
    from numba import njit
    from numba.core.errors import TypingError

    @njit
    def call(t, S, M):
        return _dispatch.victim(t, S, M, 0, 0, 1)

    S, M = _state_for(random_trace(1))
    with pytest.raises(TypingError, match="no eviction rule is registered under code"):
        call(_dispatch.tag(len(EVICTION)), S, M)


def _state_for(trace):
    from simcache.simulator import _learner
    from simcache.state import new_state

    work = simcache.Workload(trace)
    S = new_state(keys=work.demand.keys, future=work.future, num_layers=trace.num_layers,
                  num_experts=trace.num_experts, pool_caps=[2] * trace.num_layers)
    return S, _learner(work, None, 0.1, 4, 100, 0.99, active=False)


def test_docs_policy_tables_come_from_the_registry():
    from pathlib import Path

    from simcache.policies import markdown_tables

    text = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    assert markdown_tables() in text, "docs/metrics.md: rerun `python -m simcache.policies`"


@functools.lru_cache(maxsize=None)
def _victims(name):
    """A rule's victims on one trace with locality, in per-layer pools and in one global pool
    (least-stale equals LRU per layer by design, and differs only across layers)."""
    t = random_trace(21, experts=8, requests=6, length=(30, 40))
    runs = [simcache.simulate(t, None, c, evict=name, scope=scope, record=True, **rule_inputs(name, t))
            for scope, c in (("layer", 3), ("global", 6))]
    return np.concatenate([r.decisions.victim for r in runs])


@pytest.mark.parametrize("name", sorted(EVICTION))
def test_each_eviction_rule_behaves_differently_from_the_rest(name):
    """Every code reaches its own rule: each rule's decisions are distinct from every other
    rule's (a mis-wired dispatch would duplicate another)."""
    mine = _victims(name)
    assert all(not np.array_equal(mine, _victims(o)) for o in EVICTION if o != name)


def test_presets_resolve():
    for name, (e, a) in PRESETS.items():
        ev, ad = resolve(name)
        assert (ev.name, ad.name) == (e, a)
    with pytest.raises(simcache.SimcacheError, match="unknown policy 'nope'"):
        resolve("nope")
    with pytest.raises(simcache.SimcacheError, match="unknown eviction rule"):
        resolve("lru", evict="mru")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(capacity=0), "capacity must be a positive integer"),
        (dict(capacity=7), "capacity 7 exceeds the 6 experts per layer"),
        (dict(capacity=13, scope="global"), "capacity 13 exceeds the 12 experts in the global pool"),
        (dict(capacity=2, threshold=1.5), "threshold 1.5 is outside"),
        (dict(capacity=2, threshold="x/E"), "threshold must be a number"),
        (dict(capacity=2, batch=0), "batch must be a positive integer"),
        (dict(capacity=2, scope="rack"), "scope must be"),
        (dict(capacity=2, prior=np.zeros((1, 6, 6))), "prior has shape"),
        (dict(capacity=None), "capacity is required"),
    ],
)
def test_bad_arguments(kwargs, message):
    t = random_trace(1)
    with pytest.raises(simcache.SimcacheError, match=message):
        simcache.simulate(t, "markov", **kwargs)


def test_result_attributes_and_timing():
    t = random_trace(2)
    r = simcache.simulate(t, "lru", 2)
    assert r.loads == r.fills + r.bypasses + r.forced_bypasses
    assert r.bytes_loaded == r.loads * t.expert_bytes
    assert 0 <= r.hit_ratio <= 1
    for key in ("accesses", "hits", "fills", "bypasses", "forced_bypasses", "evictions", "reloads"):
        assert r.per_layer[key].shape == (t.num_layers,) and r.per_layer[key].sum() == getattr(r, key)
    cal = simcache.default_calibration()
    # serial copies: time = compute + loads x copy time, exactly
    serial = simcache.simulate(t, "lru", 2, overlap=False)
    assert serial.time_s == pytest.approx(serial.compute_s + serial.loads * cal.copy_seconds(t.expert_bytes))
    # overlapped copies are never slower, never faster than either part alone
    assert max(r.compute_s, r.transfer_s) <= r.time_s <= serial.time_s + 1e-12
    assert r.tokens_per_s == pytest.approx(r.decode_tokens / r.time_s)
    d = r.to_dict(per_layer=True)
    assert d["hits"] == r.hits and len(d["per_layer"]["hits"]) == t.num_layers


def test_no_expert_bytes_means_no_time():
    t = simcache.synth(2, 5, num_layers=1, num_experts=4, top_k=1, expert_bytes=None)
    r = simcache.simulate(t, "lru", 2)
    assert r.bytes_loaded is None and r.time_s is None and r.tokens_per_s is None
    assert simcache.simulate(t, "lru", 2, expert_bytes=1000).bytes_loaded == r.loads * 1000


def test_relative_threshold():
    t = random_trace(4)
    a = simcache.simulate(t, "markov", 2, threshold="1.2/E")
    assert a.threshold == pytest.approx(1.2 / t.num_experts)
