"""The one-pass LRU curve equals separate LRU runs at every capacity, per layer and global."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simcache
from simcache.mrc import _direct_runs, _distances, _distances_bits, lru_curve, lru_results, stack_distances
from simcache.simulator import COMPUTE_S, COUNTERS, TIME_S, _timing
from simcache.workload import Workload

from . import naive
from .conftest import TRACES
from .strategies import traces

# small pools, and pools wider than 64 keys (several bitset words; the Fenwick-tree stack)
SMALL_AND_WIDE = st.one_of(traces(max_layers=3, max_experts=7),
                           traces(max_layers=2, max_experts=80, max_k=6, max_requests=3, max_len=6))

FIELDS = ("policy", "evict", "admit", "capacity", "scope", "batch", "prefill", "threshold", "model",
          "num_layers", "num_experts", "top_k", "expert_bytes", "steps", "decode_tokens", "calibration")


def assert_same(got, want):
    for name in FIELDS:
        assert getattr(got, name) == getattr(want, name), name
    assert got.per_layer.keys() == want.per_layer.keys()
    for name, values in want.per_layer.items():
        # exact, times included: the curve repeats the simulator's arithmetic in its order
        assert np.array_equal(got.per_layer[name], values), (name, got.per_layer[name], values)


@settings(max_examples=40, deadline=None)
@given(traces(max_layers=3, max_experts=7), st.sampled_from([1, 16]), st.sampled_from(["skip", "step"]),
       st.sampled_from(["layer", "global"]), st.booleans())
def test_curve_equals_separate_runs_at_every_capacity(trace, batch, prefill, scope, overlap):
    work = Workload(trace, batch, prefill)
    L, E = trace.num_layers, trace.num_experts
    caps = list(range(1, (E if scope == "layer" else L * E) + 1))
    for got, c in zip(lru_results(work, caps, scope=scope, overlap=overlap), caps):
        assert_same(got, simcache.simulate(work, "lru", c, scope=scope, overlap=overlap))
    curve = lru_curve(work, scope=scope)
    for j, c in enumerate(caps):
        assert curve.hits[j].tolist() == simcache.simulate(work, "lru", c, scope=scope).per_layer["hits"].tolist()


@pytest.mark.parametrize("name", ["flame-moe-290m", "trained-olmoe-32e"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_curve_on_bundled_traces(name, scope):
    t = simcache.read_trace(TRACES / f"{name}.parquet")
    work = Workload(t, 4)
    stack = stack_distances(work, scope)
    L, E = t.num_layers, t.num_experts
    top = E if scope == "layer" else L * E
    caps = sorted({stack.smallest, stack.smallest + 1, top // 2, top} - {0})
    caps = [c for c in caps if c <= top] + [max(1, stack.smallest - 1)]
    for got, c in zip(lru_results(work, caps, scope=scope, stack=stack), caps):
        assert_same(got, simcache.simulate(work, "lru", c, scope=scope))
    # a stack kept without distances is rebuilt rather than misread
    quick = stack_distances(work, scope, distances=False)
    got = lru_results(work, [stack.smallest], scope=scope, stack=quick)[0]
    assert_same(got, simcache.simulate(work, "lru", stack.smallest, scope=scope))


@settings(max_examples=40, deadline=None)
@given(SMALL_AND_WIDE, st.sampled_from([1, 16]), st.sampled_from(["skip", "step"]), st.sampled_from(["layer", "global"]))
def test_stack_distances_equal_the_twin(trace, batch, prefill, scope):
    work = Workload(trace, batch, prefill)
    L, E = trace.num_layers, trace.num_experts
    want, layers = naive.stack_distances(trace, batch, prefill, scope)
    s = stack_distances(work, scope)
    assert s.distance.tolist() == want
    hist = np.zeros_like(s.histogram)
    for d, l in zip(want, layers):
        if d >= 0:
            hist[l, d] += 1
    assert s.histogram.tolist() == hist.tolist()
    assert s.cold.tolist() == [sum(1 for d, m in zip(want, layers) if d < 0 and m == l) for l in range(L)]
    assert s.cold_layers.tolist() == [l for d, l in zip(want, layers) if d < 0]
    quick = stack_distances(work, scope, distances=False)  # what the hit curve reads
    assert quick.distance.size == 0 and np.array_equal(quick.histogram, s.histogram)
    assert np.array_equal(quick.cold, s.cold) and np.array_equal(quick.cold_layers, s.cold_layers)
    # both kernels, where the bitsets fit (stack_distances picks one by pool size)
    pool = E if scope == "layer" else L * E
    kernels = (_distances, _distances_bits) if pool <= 64 else (_distances,)
    for kernel in kernels:
        dist, cold = np.empty_like(s.distance), np.zeros_like(s.cold)
        cold_layers, hist = np.empty(L * E, np.int16), np.zeros_like(s.histogram)
        n = kernel(work.demand.group_ptr, work.demand.keys, L, E, scope == "layer", dist, hist, cold, cold_layers)
        assert dist.tolist() == want and cold_layers[:n].tolist() == s.cold_layers.tolist(), kernel


@settings(max_examples=40, deadline=None)
@given(SMALL_AND_WIDE, st.sampled_from([1, 16]), st.sampled_from(["skip", "step"]), st.sampled_from(["layer", "global"]),
       st.booleans())
def test_direct_pass_equals_separate_runs(trace, batch, prefill, scope, overlap):
    """The direct pass (lru_results uses it below the largest group) is exact at any
    capacity: its counters equal the twin's LRU and its times the simulator's, bit for bit."""
    work = Workload(trace, batch, prefill)
    L, E = trace.num_layers, trace.num_experts
    top = E if scope == "layer" else L * E
    smallest = int(np.diff(work.demand.group_ptr).max())
    caps = sorted({*range(1, min(top, smallest + 2) + 1), top // 2 or 1, top})
    _, _, t_copy, lut, ov = _timing(work, None, None, overlap)
    counters, layer_time, _ = _direct_runs(work, scope, caps, lut, t_copy, ov)
    for j, c in enumerate(caps):
        want = naive.simulate(trace, "lru", "all", c, scope=scope, batch=batch, prefill=prefill)["counters"]
        for name, per_layer in want.items():
            assert counters[j, :, list(COUNTERS).index(name)].tolist() == per_layer, (c, name)
        r = simcache.simulate(work, "lru", c, scope=scope, overlap=overlap)
        assert np.array_equal(layer_time[j, :, COMPUTE_S], r.per_layer["compute_s"]), c
        assert np.array_equal(layer_time[j, :, TIME_S], r.per_layer["time_s"]), c


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_stack_kernels_agree_on_a_long_trace(scope):
    # thousands of accesses per pool: the Fenwick-tree kernel renumbers its stamps many times
    t = simcache.synth(6, 40, num_layers=2, num_experts=9, top_k=3, seed=5)
    work = Workload(t, 3)
    want, _ = naive.stack_distances(t, 3, scope=scope)
    L, E = t.num_layers, t.num_experts
    for kernel in (_distances, _distances_bits):
        dist, cold = np.empty(len(want), np.int32), np.zeros(L, np.int64)
        hist = np.zeros((L, E if scope == "layer" else L * E), np.int64)
        kernel(work.demand.group_ptr, work.demand.keys, L, E, scope == "layer", dist, hist, cold,
               np.empty(L * E, np.int16))
        assert dist.tolist() == want, kernel


def test_stack_distance_example():
    # one layer, 3 experts, top-1: 0 1 2 0 1
    t = simcache.Trace.from_arrays(np.array([[0], [1], [2], [0], [1]]), request=[0] * 5,
                                   position=range(5), layer=[0] * 5, num_experts=3)
    s = stack_distances(Workload(t))
    # stacks before each access: [], [0], [1,0], [2,1,0], [0,2,1]
    assert s.distance.tolist() == [-1, -1, -1, 2, 2]
    assert s.histogram.tolist() == [[0, 0, 2]] and s.cold.tolist() == [3]


def test_bad_capacity_is_one_line():
    t = simcache.synth(2, 8, num_layers=1, num_experts=4, top_k=1)
    with pytest.raises(simcache.SimcacheError, match="exceeds the 4 experts"):
        lru_results(t, [5])
    with pytest.raises(simcache.SimcacheError, match="capacities must lie in 1..4"):
        lru_curve(t, capacities=[0, 2])
