"""The access stream's two builders (one token per step, and the general pass) agree, and
both skip expert ids below 0 (gap rows: -1 = no record, -1 padding after real ids)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import simcache
from simcache.workload import Steps, demand, schedule

from .strategies import traces


def _with_gaps(trace, mask):
    """The trace with the masked expert slots set to -1, real ids moved first in each row
    (the padding rule), built without validation (today's reader refuses ids < 0)."""
    ex = np.where(mask, -1, trace.experts).astype(np.int16)
    order = np.argsort(ex < 0, axis=1, kind="stable")
    ex = np.take_along_axis(ex, order, axis=1)
    return simcache.Trace(request=trace.request, position=trace.position, phase=trace.phase,
                          layer=trace.layer, experts=np.ascontiguousarray(ex), metadata=dict(trace.metadata))


def _expected(trace, steps):
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    ex = trace.experts.reshape(-1, L, k)
    keys, counts, sizes = [], [], []
    for s in range(steps.num_steps):
        toks = steps.step_tokens[steps.step_ptr[s]:steps.step_ptr[s + 1]]
        for l in range(L):
            c = {}
            for t in toks:
                for e in ex[t, l]:
                    if e >= 0:
                        c[int(e)] = c.get(int(e), 0) + 1
            keys += [l * E + e for e in sorted(c)]
            counts += [c[e] for e in sorted(c)]
            sizes.append(len(c))
    return keys, counts, sizes


@settings(max_examples=60, deadline=None)
@given(traces(), st.integers(1, 3), st.sampled_from(["skip", "step"]), st.data())
def test_demand_skips_gaps_and_matches_a_plain_count(trace, batch, prefill, data):
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=trace.experts.size,
                                       max_size=trace.experts.size)), bool).reshape(trace.experts.shape)
    t = _with_gaps(trace, mask)
    steps = schedule(t, batch, prefill)
    d = demand(t, steps)
    keys, counts, sizes = _expected(t, steps)
    assert d.keys.tolist() == keys
    assert d.tokens.tolist() == counts
    assert np.diff(d.group_ptr).tolist() == sizes


@settings(max_examples=40, deadline=None)
@given(traces(prompts=False), st.data())
def test_one_token_path_equals_the_general_pass(trace, data):
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=trace.experts.size,
                                       max_size=trace.experts.size)), bool).reshape(trace.experts.shape)
    t = _with_gaps(trace, mask)
    steps = schedule(t, 1)
    fast = demand(t, steps)
    # the same token order as steps of one token each, but described as pairs of steps
    # joined by an empty step: the general pass runs, the groups are the same
    n = steps.step_tokens.shape[0]
    ptr = np.repeat(steps.step_ptr, 2)[1:]  # every step followed by an empty one
    padded = Steps(ptr, steps.step_tokens, steps.decode_tokens, steps.request_ptr, steps.request_first)
    slow = demand(t, padded)
    L = t.num_layers
    sizes = np.diff(slow.group_ptr).reshape(-1, L)
    assert not sizes[1::2].any()  # the empty steps demand nothing
    assert slow.keys.tolist() == fast.keys.tolist()
    assert slow.tokens.tolist() == fast.tokens.tolist()
    assert sizes[0::2].ravel().tolist() == np.diff(fast.group_ptr).tolist()
    assert n == steps.num_steps
