"""Synthetic traces: shape, determinism, and that they carry the structure asked for."""

from __future__ import annotations

import numpy as np
import pytest

import simcache

from .conftest import SEED_MATRICES


def test_parametric_shape_and_seed():
    a = simcache.synth(5, (3, 9), num_layers=3, num_experts=12, top_k=3, seed=4)
    b = simcache.synth(5, (3, 9), num_layers=3, num_experts=12, top_k=3, seed=4)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert a.num_requests == 5 and a.top_k == 3
    assert (np.sort(a.experts, axis=1)[:, 1:] != np.sort(a.experts, axis=1)[:, :-1]).all()
    np.testing.assert_allclose(a.weights.sum(axis=1), 1.0, rtol=1e-5)


def test_stickiness_raises_top1_repeats():
    def repeat_rate(t):
        top1 = t.token_experts()[:, 0, 0]
        same_req = t.token_request()[1:] == t.token_request()[:-1]
        return float((top1[1:] == top1[:-1])[same_req].mean())

    loose = simcache.synth(20, 200, num_layers=1, num_experts=16, top_k=1, stickiness=0.0, seed=1)
    sticky = simcache.synth(20, 200, num_layers=1, num_experts=16, top_k=1, stickiness=0.98, seed=1)
    assert repeat_rate(sticky) > 2 * repeat_rate(loose)


def test_chain_follows_the_transition_counts():
    counts = np.zeros((1, 4, 4))
    counts[0, 0, 1] = counts[0, 1, 2] = counts[0, 2, 3] = counts[0, 3, 0] = 1  # a cycle
    t = simcache.synth(3, 50, transitions=counts, top_k=1, seed=2)
    top1 = t.token_experts()[:, 0, 0].astype(int)
    same = t.token_request()[1:] == t.token_request()[:-1]
    assert ((top1[:-1] + 1) % 4 == top1[1:])[same].all()


def test_seed_matrix_shapes():
    path = SEED_MATRICES / "qwen_top1_transition_counts.npy"
    if not path.exists():
        pytest.skip("seed matrices not present")
    t = simcache.synth(4, 20, transitions=np.load(path), top_k=4, seed=0)
    assert (t.num_layers, t.num_experts, t.top_k) == (24, 60, 4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_requests=0), "num_requests must be a positive integer"),
    (dict(length=(5, 2)), "length hi must be >= 5"),
    (dict(top_k=9, num_experts=8), "top_k must be"),
    (dict(transitions=np.ones((2, 3))), "transitions must have shape"),
    (dict(communities=20, num_experts=8), "communities must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(simcache.SimcacheError, match=message):
        simcache.synth(**{"num_requests": 2, "length": 4, **kwargs})
