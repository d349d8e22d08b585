"""The copy-engine timeline kernel (simcache.timeline) against its event-list twin
(tests/naive.py Timeline), group by group; and with no prefetch, docs/design.md §5's numbers exactly."""

from __future__ import annotations

import numpy as np
import pytest

import simcache
from simcache import timeline as tl
from simcache.simulator import HIT
from simcache.workload import Workload

from . import naive
from .conftest import random_trace


class Kernel:
    """The jitted timeline behind the twin's method names."""

    def __init__(self, num_keys, t_copy, ring=64):
        self.T = tl.new_timeline(num_keys, t_copy, ring)
        self.groups = []
        self.durations = []

    def begin(self):
        self.start = float(self.T.clock[0])
        tl.begin(self.T)

    def waits(self, key):
        return tl.waits(self.T, key)

    def demand(self, key, cost):
        tl.demand(self.T, key, cost)

    def use(self, key, cost):
        tl.use(self.T, key, cost)

    def request(self, key, target, origin):
        tl.request(self.T, key, target, origin)

    def end(self, compute, overlap):
        d = tl.end(self.T, compute, overlap)
        self.durations.append(d)
        self.groups.append((self.start, float(self.T.clock[0]), d - compute))
        return d

    def advance(self, decide):
        T = self.T
        j = tl.next_start(T)
        while j >= 0:
            r = dict(key=int(T.q_key[j]), target=int(T.q_target[j]), origin=int(T.q_origin[j]))
            if decide(r):
                tl.start(T, j)
            else:
                tl.drop(T, j)
            j = tl.next_start(T)


def script(seed, n_groups=60, keys=12, t_copy=1.0):
    """Random groups: used keys (ascending) with compute costs, keys forgotten at the start
    (an eviction), and prefetch requests (key, distance)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_groups):
        used = sorted(rng.choice(keys, size=rng.integers(0, 4), replace=False).tolist())
        costs = rng.choice([0.05, 0.3, 1.5, 3.0], size=len(used)) * t_copy
        forget = rng.choice(keys, size=rng.integers(0, 3), replace=False).tolist()
        req = [(int(k), int(rng.integers(1, 4))) for k in rng.choice(keys, size=rng.integers(0, 4), replace=False)]
        out.append((list(zip(used, costs.tolist())), forget, req))
    return out


def drive(impl, groups, overlap=True):
    """Serve ``groups`` with a toy cache (a set): absent keys are demand copies, present
    ones wait if their copy is late; a request is dropped at its start if its target has
    started or its key is present."""
    present = set()
    copied = []
    for g, (used, forget, requests) in enumerate(groups):
        present -= set(forget)
        impl.begin()
        compute = 0.0
        for key, cost in used:
            compute += cost
            if key in present:
                if impl.waits(key):
                    impl.use(key, cost)
            else:
                impl.demand(key, cost)
                present.add(key)
        for key, distance in requests:
            impl.request(key, g + distance, g)
        impl.end(compute, overlap)

        def decide(r, g=g):
            if r["target"] <= g or r["key"] in present:
                return False
            present.add(r["key"])
            copied.append((g, r["key"], r["target"]))
            return True

        impl.advance(decide)
    return np.array(impl.groups), copied


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("overlap", [True, False])
def test_kernel_matches_twin_on_every_group(seed, overlap):
    t_copy = (1.0, 0.37, 2.5)[seed % 3]
    groups = script(seed, t_copy=t_copy)
    fast, fast_copies = drive(Kernel(12, t_copy), groups, overlap)
    slow, slow_copies = drive(naive.Timeline(t_copy), groups, overlap)
    assert fast_copies == slow_copies  # the same prefetches started, after the same groups
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)  # start, end, stall
    assert (fast[1:, 0] == fast[:-1, 1]).all()  # a group starts when the previous one ends
    assert (fast[:, 2] >= -1e-12).all()


def test_demand_overtakes_queued_prefetches_but_not_the_one_in_flight():
    k = Kernel(4, 1.0)
    k.begin()
    k.request(1, 1, 0)  # two prefetches made at t=0 for group 1
    k.request(2, 1, 0)
    k.end(0.5, True)  # group 0 computes 0.5 s; the first prefetch starts at 0, the second at
    k.advance(lambda r: True)  # 1.0 > 0.5: still queued
    assert k.T.q_pos[1] == 1 and k.T.arrival[1] == 1.0
    k.begin()  # group 1 starts at 0.5 with a demand copy: after the in-flight copy, before key 2
    k.demand(3, 0.25)
    assert k.T.arrival[3] == 2.0
    k.use(1, 0.25)
    assert k.end(0.5, True) == pytest.approx(1.75)  # key 3 arrives at 2.0 and computes 0.25


def test_ring_forgets_the_oldest_request_when_full():
    k = Kernel(4, 1.0, ring=2)
    k.begin()
    for key in (1, 2, 3):
        k.request(key, 1, 0)
    assert k.T.q_pos[1] == 2 and k.T.q_key[k.T.q_pos[0]] == 2


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("seed,batch,policy", [(0, 1, "lru"), (1, 3, "markov"), (2, 2, "belady-bypass")])
def test_no_prefetch_gives_design_5_numbers_exactly(seed, batch, policy, overlap):
    """Replaying the simulator's decisions through the timeline with nothing prefetched gives
    its per-group times bit for bit (and the twin to rounding)."""
    trace = random_trace(seed, prompt=1)
    work = Workload(trace, batch)
    r = simcache.simulate(work, policy, 2, record=True, overlap=overlap, threshold=0.2)
    cal = simcache.default_calibration()
    t_copy = cal.copy_seconds(trace.expert_bytes)
    lut = cal.ffn_seconds_for(np.arange(work.max_tokens + 1), trace.expert_bytes)
    d = work.demand
    fast, slow = Kernel(trace.num_layers * trace.num_experts, t_copy), naive.Timeline(t_copy)
    for g in range(d.group_ptr.shape[0] - 1):
        lo, hi = d.group_ptr[g], d.group_ptr[g + 1]
        for impl in (fast, slow):
            impl.begin()
            compute = 0.0
            for i in range(lo, hi):
                cost = lut[d.tokens[i]]
                compute += cost
                if r.decisions.outcome[i] != HIT:
                    impl.demand(int(d.keys[i]), cost)
                else:
                    assert not impl.waits(int(d.keys[i]))
            impl.end(compute, overlap)
    np.testing.assert_array_equal(np.array(fast.durations), r.decisions.group_time)
    assert fast.T.clock[0] == np.cumsum(r.decisions.group_time)[-1]  # the clock carries them
    np.testing.assert_allclose(np.array(slow.groups), np.array(fast.groups), rtol=1e-12, atol=1e-15)
