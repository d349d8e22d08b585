"""The decision log holds the settings that made it: re-simulating from them gives its decisions."""

from __future__ import annotations

import numpy as np
import pytest

import simcache
from simcache.decisions import prior_hash, read_decisions, write_decisions
from simcache.errors import SimcacheError

from .conftest import random_trace


def test_settings_reproduce_the_logged_decisions(tmp_path):
    t = random_trace(3, layers=2, experts=6, requests=6, length=(8, 14), prompt=3)
    prior = simcache.transition_counts(random_trace(4, layers=2, experts=6, requests=3))
    work = simcache.Workload(t, batch=3, prefill="step")
    options = dict(scope="global", threshold="2/E", admit="markov-h", prior=prior, horizon=2, decay=0.5,
                   decay_every=3, seed=5)
    r = simcache.simulate(work, "random", 5, record=True, **options)
    log = read_decisions(write_decisions(work, r, tmp_path / "d.parquet", options, prior_source="p.npy"))
    st = log.settings
    assert (st.policy, st.capacity, st.batch, st.prefill, st.seed, st.decay, st.decay_every, st.horizon) == \
        ("random+markov-h", 5, 3, "step", 5, 0.5, 3, 2)
    assert st.threshold == 2 / 6 and st.prior == "p.npy" and st.prior_hash == prior_hash(prior)
    again = simcache.simulate(t, prior=prior, **st.simulate_options(), record=True)
    log.check_decisions(again.decisions)  # raises on any difference
    np.testing.assert_array_equal(log.outcome, again.decisions.outcome)
    # a different seed decides differently, and the check says where and what the log was made with
    other = simcache.simulate(work, "random", 5, record=True, **{**options, "seed": 6})
    with pytest.raises(SimcacheError, match=r"decides differently from the decision log from access \d+"):
        log.check_decisions(other.decisions)


def test_a_log_refuses_another_trace_and_an_old_version(tmp_path):
    t = random_trace(3)
    work = simcache.Workload(t)
    path = write_decisions(work, simcache.simulate(work, "lru", 2, record=True), tmp_path / "d.parquet")
    log = read_decisions(path)
    assert log.settings.prior_hash is None and log.settings.split is None
    with pytest.raises(SimcacheError, match="does not match the trace: it was made from routing"):
        log.reproduce(random_trace(4))
    scored, prior = log.reproduce(t)
    assert scored is t and prior is None
