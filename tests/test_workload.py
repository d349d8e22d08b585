"""Continuous batching and the access stream against the plain twins."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simcache
from simcache.workload import demand, next_use, schedule, step_pairs

from . import naive
from .strategies import traces


@settings(max_examples=60, deadline=None)
@given(traces(), st.integers(1, 4), st.sampled_from(["skip", "step"]))
def test_schedule_and_demand_match_the_twin(trace, batch, prefill):
    steps = schedule(trace, batch, prefill)
    ref = naive.schedule(trace, batch, prefill)
    got = [steps.step_tokens[steps.step_ptr[s]:steps.step_ptr[s + 1]].tolist() for s in range(steps.num_steps)]
    assert got == [[t for t, _ in step] for step in ref]
    for step in ref:
        for t, prev in step:
            assert steps.token_prev[t] == (-1 if prev is None else prev)
    if steps.num_steps == 0:
        return
    d = demand(trace, steps)
    groups = naive.accesses(trace, ref)
    assert d.keys.tolist() == [k for _, _, acc in groups for k, _ in acc]
    assert d.tokens.tolist() == [c for _, _, acc in groups for _, c in acc]
    assert np.diff(d.group_ptr).tolist() == [len(acc) for _, _, acc in groups]
    pair_ptr, prev, cur = step_pairs(steps)
    assert [list(zip(prev[pair_ptr[s]:pair_ptr[s + 1]], cur[pair_ptr[s]:pair_ptr[s + 1]]))
            for s in range(steps.num_steps)] == [[(p, t) for t, p in step if p is not None] for step in ref]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60))
def test_next_use_matches_a_scan(seq):
    keys = np.array(seq, np.int32)
    got = next_use(keys, 6)
    n = len(seq)
    for i, k in enumerate(seq):
        later = [j for j in range(i + 1, n) if seq[j] == k]
        assert got[i] == (later[0] if later else 2 * n - i)


def test_batch_and_prefill_examples():
    # two requests: 2 prompt + 2 decode tokens, and 1 prompt + 1 decode token
    t = simcache.Trace.from_arrays(
        np.array([[0], [1], [2], [3], [0], [1]]), request=[0, 0, 0, 0, 1, 1], position=[0, 1, 2, 3, 0, 1],
        layer=[0] * 6, phase=[0, 0, 1, 1, 0, 1], num_experts=4,
    )
    s = schedule(t, batch=2, prefill="step")
    steps = [s.step_tokens[s.step_ptr[i]:s.step_ptr[i + 1]].tolist() for i in range(s.num_steps)]
    assert steps == [[0, 1], [4], [2, 5], [3]]
    assert s.decode_tokens == 3
    s = schedule(t, batch=1, prefill="skip")
    assert s.step_tokens.tolist() == [2, 3, 5] and s.token_prev[2] == -1 and s.token_prev[3] == 2


@pytest.mark.parametrize("batch", [0, -1, 1.5])
def test_bad_batch(batch):
    t = simcache.synth(1, 4, num_layers=1, num_experts=4, top_k=1)
    with pytest.raises(simcache.SimcacheError, match="batch must be a positive integer"):
        schedule(t, batch)
