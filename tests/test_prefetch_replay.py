"""Replay-side prefetch (simcache.replay.prefetch) on the CPU with tiny shapes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import simcache  # noqa: E402
from simcache.replay.prefetch import PrefetchIssuer, Schedule  # noqa: E402


def tiny(schedule, n_keys=6, width=5, slots=4, buffers=2):
    host = torch.arange(n_keys * width, dtype=torch.float32).view(n_keys, width)  # (N, W)
    pool = torch.zeros((slots, width))  # (S, W)
    bufs = torch.zeros((buffers, width))  # (P, W)
    issuer = PrefetchIssuer(schedule, lambda key, slot: pool[slot], bufs, lambda key: host[key])
    return issuer, host, pool, bufs


def test_copies_land_where_scheduled_group_by_group():
    s = Schedule(after=np.array([0, 0, 2, 5]), key=np.array([3, 4, 1, 5], np.int32),
                 slot=np.array([1, -1, 0, -1], np.int32), buffer=np.array([-1, 0, -1, 1], np.int32))
    issuer, host, pool, bufs = tiny(s)
    assert s.buffers == 2
    assert issuer.issue_after(0) == 2
    assert torch.equal(pool[1], host[3]) and torch.equal(bufs[0], host[4])
    assert issuer.issue_after(1) == 0 and not pool[0].any()  # nothing starts during group 1
    assert issuer.issue_after(3) == 0  # group 2 was not replayed: its prefetch is skipped
    assert not pool[0].any()
    assert issuer.issue_after(5) == 1 and torch.equal(bufs[1], host[5])
    assert issuer.issued == 3


def test_delivered_names_the_copy_once():
    s = Schedule(after=np.array([0, 1]), key=np.array([2, 3], np.int32), slot=np.array([0, -1], np.int32),
                 buffer=np.array([-1, 0], np.int32))
    issuer, *_ = tiny(s)
    issuer.issue_after(0)
    issuer.issue_after(1)
    assert issuer.delivered(2) == (None, 0)  # (no event on the CPU, prefetch 0)
    assert issuer.delivered(2) == (None, -1)  # waited on already
    assert issuer.delivered(3, buffer=0) == (None, 1)
    assert issuer.delivered(3) == (None, -1)  # a slot is not a buffer


def test_forget_after_a_demand_fill():
    s = Schedule(after=np.array([0]), key=np.array([2], np.int32), slot=np.array([0], np.int32),
                 buffer=np.array([-1], np.int32))
    issuer, *_ = tiny(s)
    issuer.issue_after(0)
    issuer.forget(2)
    assert issuer.delivered(2) == (None, -1)


def test_schedule_checks():
    with pytest.raises(simcache.SimcacheError, match="one destination each"):
        Schedule(np.array([0]), np.array([1], np.int32), np.array([0], np.int32), np.array([0], np.int32))
    with pytest.raises(simcache.SimcacheError, match="issue order"):
        Schedule(np.array([1, 0]), np.array([1, 2], np.int32), np.array([0, 1], np.int32),
                 np.array([-1, -1], np.int32))
    s = Schedule(np.array([0]), np.array([1], np.int32), np.array([-1], np.int32), np.array([2], np.int32))
    with pytest.raises(simcache.SimcacheError, match="uses 3 buffers, 2 given"):
        tiny(s)
    d = {"after": [0, 3], "key": [1, 2], "slot": [0, -1], "buffer": [-1, 0]}
    assert Schedule.from_dict(d).in_groups([3]).key.tolist() == [2]
