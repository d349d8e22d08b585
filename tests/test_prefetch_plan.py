"""Prefetch predictors (simcache.prefetch.plan) against their twins in tests/naive.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import simcache
from simcache.prefetch import plan
from simcache.workload import Workload

from . import naive
from .conftest import random_trace


def with_lookahead(trace, lookahead):
    """``trace`` with its ``lookahead`` column set: (rows, m) int16, -1 padded."""
    return dataclasses.replace(trace, lookahead=np.asarray(lookahead, np.int16)).validated()


def noisy_lookahead(trace, seed, m=None, accuracy=0.7):
    """A look-ahead column: each row lists the next layer's true experts with probability
    ``accuracy`` each, the rest random, -1 padded; the last layer's rows are all -1."""
    rng = np.random.default_rng(seed)
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    m = m or min(2 * k, E)
    ex = trace.token_experts()
    out = np.full((trace.num_tokens, L, m), -1, np.int16)
    for t in range(trace.num_tokens):
        for l in range(L - 1):
            true = [e for e in ex[t, l + 1].tolist() if rng.random() < accuracy]
            rest = [e for e in rng.permutation(E).tolist() if e not in true]
            row = (true + rest)[: rng.integers(1, m + 1)]
            out[t, l, : len(row)] = row
    return with_lookahead(trace, out.reshape(trace.num_rows, m))


def as_lists(p):
    return [p.keys[p.ptr[g]:p.ptr[g + 1]].tolist() for g in range(p.ptr.shape[0] - 1)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("width", [1, 2, 5])
def test_plans_match_twins(seed, width):
    trace = noisy_lookahead(random_trace(seed, layers=3, experts=6, top_k=2, prompt=1), seed)
    prior = simcache.transition_counts(random_trace(seed + 50, layers=3, experts=6, top_k=2)) if seed % 2 else None
    batch, prefill = 1 + seed % 3, ("skip", "step")[seed % 2]
    work = Workload(trace, batch, prefill)
    for name in ("oracle", "lookahead", "markov"):
        p = plan(work, name, width, prior=prior, decay_every=4, decay=0.9)
        distance, ref = naive.prefetch_plan(trace, name, width, batch=batch, prefill=prefill, prior=prior,
                                            decay_every=4, decay=0.9, lookahead=trace.lookahead)
        assert p.distance == distance
        assert as_lists(p) == ref, name


def test_oracle_requests_the_next_layers_demand():
    trace = random_trace(3, layers=3, experts=6, top_k=2)
    work = Workload(trace, 2)
    d, L = work.demand, 3
    lists = as_lists(plan(work, "oracle", 6))
    for g, keys in enumerate(lists):
        nxt = d.keys[d.group_ptr[g + 1]:d.group_ptr[g + 2]].tolist() if g % L < L - 1 else []
        assert sorted(keys) == sorted(nxt)


def test_perfect_lookahead_is_the_oracle_at_batch_1():
    trace = random_trace(5, layers=3, experts=6, top_k=2)
    ex = trace.token_experts()
    la = np.full((trace.num_tokens, 3, 4), -1, np.int16)
    la[:, :2, :2] = ex[:, 1:, :]
    trace = with_lookahead(trace, la.reshape(trace.num_rows, 4))
    work = Workload(trace)
    a, b = as_lists(plan(work, "lookahead", 2)), as_lists(plan(work, "oracle", 2))
    assert [sorted(x) for x in a] == [sorted(x) for x in b]


def test_markov_is_causal():
    """The prediction after group g does not change when later tokens change."""
    trace = random_trace(8, layers=2, experts=6, top_k=1, requests=1, length=(30, 31))
    other = trace.experts.copy()
    other[40:] = (other[40:] + 1) % 6
    changed = simcache.Trace.from_arrays(other, request=trace.request, position=trace.position,
                                         layer=trace.layer, num_experts=6)
    a = as_lists(plan(Workload(trace), "markov", 2))
    b = as_lists(plan(Workload(changed), "markov", 2))
    assert a[:40] == b[:40] and a != b


@pytest.mark.parametrize(
    "name,width,message",
    [
        ("oracle", 0, r"prefetch width must be an integer in \[1, 6\]"),
        ("oracle", 7, r"prefetch width must be an integer in \[1, 6\]"),
        ("lookahead", 2, "needs a trace with the 'lookahead' column"),
        ("crystal-ball", 2, "unknown prefetch predictor 'crystal-ball'"),
    ],
)
def test_bad_input(name, width, message):
    with pytest.raises(simcache.SimcacheError, match=message):
        plan(Workload(random_trace(1)), name, width)


def test_bad_lookahead_column():
    trace = dataclasses.replace(random_trace(1), lookahead=np.full((3, 4), 0, np.int16))  # unchecked
    with pytest.raises(simcache.SimcacheError, match="lookahead column has shape"):
        plan(Workload(trace), "lookahead", 2)
