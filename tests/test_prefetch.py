"""Prefetch in the simulation kernel against the slow twin (tests/naive.py simulate_prefetch),
group by group and access by access; invariants; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simcache
from simcache.prefetch import plan
from simcache.workload import Workload

from . import naive
from .conftest import random_trace
from .strategies import traces
from .test_prefetch_plan import as_lists, noisy_lookahead

PREDICTORS = ("oracle", "lookahead", "markov")
EVICT = ("lru", "fifo", "lfu", "lifo", "random", "markov")


def run_both(trace, predictor, width, evict, admit, capacity, *, batch=1, scope="layer", prefill="skip",
             tau=0.1, seed=0, cal=None):
    cal = cal or simcache.default_calibration()
    work = Workload(trace, batch, prefill)
    p = plan(work, predictor, width)
    r = simcache.simulate(work, None, capacity, evict=evict, admit=admit, scope=scope, threshold=tau,
                          seed=seed, calibration=cal, prefetch=p, record=True)
    lut = cal.ffn_seconds_for(np.arange(work.max_tokens + 1), trace.expert_bytes)
    ref = naive.simulate_prefetch(trace, evict, admit, capacity, prefetch=(p.distance, as_lists(p)),
                                  t_copy=cal.copy_seconds(trace.expert_bytes), lut=lut, scope=scope,
                                  batch=batch, prefill=prefill, tau=tau, seed=seed)
    return r, ref


def compare(r, ref):
    d = r.decisions
    np.testing.assert_array_equal(d.outcome, ref["outcome"], err_msg="outcome")
    np.testing.assert_array_equal(d.slot, ref["slot"], err_msg="slot")
    np.testing.assert_array_equal(d.victim, ref["victim"], err_msg="victim")
    groups = np.array(ref["groups"])  # (start, end, stall) per group
    np.testing.assert_allclose(d.group_timeline[:, 0], groups[:, 0], rtol=1e-12, atol=1e-15, err_msg="start")
    np.testing.assert_allclose(d.group_timeline[:, 0] + d.group_time, groups[:, 1], rtol=1e-12, atol=1e-15,
                               err_msg="end")
    np.testing.assert_allclose(d.group_timeline[:, 1], groups[:, 2], rtol=1e-9, atol=1e-12, err_msg="stall")
    sched = [(after, key, slot, buf) for _, after, key, slot, buf in ref["schedule"]]
    assert d.prefetch_schedule.tolist() == [list(x) for x in sched]
    for name, values in ref["counters"].items():
        np.testing.assert_array_equal(r.per_layer[name], values, err_msg=name)
    # every copy the twin's engine made is a demand load or an issued prefetch
    assert len(ref["copies"]) == r.loads + r.prefetches


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("evict", EVICT)
@pytest.mark.parametrize("seed", range(3))
def test_kernel_matches_twin(predictor, evict, seed):
    trace = noisy_lookahead(random_trace(seed, layers=3, experts=6, top_k=2, prompt=1), seed)
    for capacity, width, batch in ((1, 1, 1), (2, 2, 2), (4, 3, 1 + seed)):
        r, ref = run_both(trace, predictor, width, evict, "all", capacity, batch=batch, seed=seed,
                          prefill=("skip", "step")[seed % 2])
        compare(r, ref)


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("admit", ["markov", "markov-h"])
def test_kernel_matches_twin_with_markov_admission(predictor, admit):
    trace = noisy_lookahead(random_trace(9, layers=3, experts=6, top_k=2, requests=6), 9)
    for capacity, batch in ((2, 1), (3, 3)):
        compare(*run_both(trace, predictor, 2, "lru", admit, capacity, batch=batch, tau=0.2))


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_kernel_matches_twin_global_scope(predictor):
    trace = noisy_lookahead(random_trace(7, layers=3, experts=5, top_k=2, requests=5), 7)
    for capacity in (2, 5, 9):
        compare(*run_both(trace, predictor, 2, "lru", "all", capacity, batch=2, scope="global"))


def test_kernel_matches_twin_on_small_experts():
    """Experts small enough that copies are short next to compute: prefetches arrive early."""
    trace = noisy_lookahead(random_trace(3, layers=4, experts=8, top_k=2, requests=6), 3)
    trace.metadata["expert_bytes"] = 1 << 14
    compare(*run_both(trace, "lookahead", 3, "lru", "all", 3, batch=4))


def test_flame_subset_against_twin(flame):
    sub = flame.select_requests(range(1, 21))
    for predictor, batch in (("oracle", 1), ("markov", 4)):
        compare(*run_both(sub, predictor, 6, "lru", "all", 16, batch=batch))


@settings(max_examples=60, deadline=None)
@given(trace=traces(max_layers=3), capacity=st.integers(1, 4), batch=st.integers(1, 3),
       data=st.data())
def test_invariants(trace, capacity, batch, data):
    E, k = trace.num_experts, trace.top_k
    capacity = min(capacity, E)
    width = data.draw(st.integers(1, E))
    predictor = data.draw(st.sampled_from(["oracle", "markov"]))
    r = simcache.simulate(trace, "lru", capacity, batch=batch, prefetch=predictor, prefetch_width=width)
    assert r.prefetch_used + r.prefetch_wasted == r.prefetches and r.prefetch_wasted >= 0
    assert r.bytes_copied == (r.loads + r.prefetches) * trace.expert_bytes
    assert r.prefetch_wasted_bytes == r.prefetch_wasted * trace.expert_bytes
    assert r.hits + r.fills + r.bypasses + r.forced_bypasses + r.prefetched == r.accesses
    assert r.stall_s >= -1e-12 and r.time_s == pytest.approx(r.compute_s + r.stall_s)


@settings(max_examples=80, deadline=None)
@given(trace=traces(max_layers=3), capacity=st.integers(1, 6), batch=st.integers(1, 3), data=st.data())
def test_oracle_at_full_width_never_stalls_more_than_no_prefetch(trace, capacity, batch, data):
    """LRU, per-layer pools: with a width covering every group's demand (k at batch 1), the
    oracle fills what the demand would, in the same order, only earlier."""
    E, k = trace.num_experts, trace.top_k
    capacity = min(capacity, E)
    width = data.draw(st.integers(k, E)) if batch == 1 else E
    evict = data.draw(st.sampled_from(["lru", "fifo"]))
    none = simcache.simulate(trace, None, capacity, evict=evict, batch=batch)
    ours = simcache.simulate(trace, None, capacity, evict=evict, batch=batch, prefetch="oracle",
                             prefetch_width=width)
    assert none.stall_s == pytest.approx(none.time_s - none.compute_s)
    assert ours.stall_s <= none.stall_s + 1e-12
    assert ours.compute_s == pytest.approx(none.compute_s)
    assert ours.hits + ours.prefetched >= none.hits


def test_none_leaves_results_unchanged():
    trace = random_trace(2)
    a = simcache.simulate(trace, "lru", 2, batch=2, record=True)
    b = simcache.simulate(trace, "lru", 2, batch=2, record=True, prefetch="none")
    assert a.to_dict(per_layer=True) == b.to_dict(per_layer=True)
    np.testing.assert_array_equal(a.decisions.group_time, b.decisions.group_time)
    assert a.per_layer.keys() == b.per_layer.keys() and b.prefetches == 0 and b.prefetch == "none"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prefetch="lookahead"), "needs a trace with the 'lookahead' column"),
        (dict(prefetch="oracle", prefetch_width=0), r"prefetch width must be an integer in \[1, 6\]"),
        (dict(prefetch="oracle", prefetch_width=7), r"prefetch width must be an integer in \[1, 6\]"),
        (dict(prefetch="psychic"), "unknown prefetch predictor 'psychic'"),
        (dict(prefetch="oracle", overlap=False), "prefetch needs a copy stream"),
        (dict(prefetch="oracle", evict="belady"), "does not run with belady eviction"),
        (dict(prefetch="oracle", calibration=simcache.Calibration("bare GPU", ffn_tokens=[1], ffn_seconds=[1e-4])),
         r"prefetch needs copy figures, and the calibration \(bare GPU\) has none"),
        (dict(prefetch="oracle", calibration=simcache.Calibration(
            "fast GPU", copy_bytes=[1 << 20], copy_gbps=[50.0], ffn_tokens=[1], ffn_seconds=[1e-4],
            group_ffn={"experts": [1], "tokens": [1], "seconds": [[1e-4]], "expert_bytes": 1 << 20})),
         "use a calibration probed with --issue eager"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(simcache.SimcacheError, match=message):
        simcache.simulate(random_trace(1), "lru", 2, **kwargs)


def test_cli_prefetch_and_decision_log(tmp_path):
    from click.testing import CliRunner

    from simcache.cli import main
    from simcache.decisions import read_decisions
    from simcache.replay.prefetch import Schedule

    path = simcache.write_trace(random_trace(3, layers=3, experts=6), tmp_path / "t.parquet")
    runner = CliRunner()
    out = runner.invoke(main, ["simulate", str(path), "--capacity", "2", "--prefetch", "none,oracle,markov",
                               "--prefetch-width", "2", "--json"])
    assert out.exit_code == 0, out.output
    import json

    res = json.loads(out.stdout)["results"]  # (a first compile may warn on stderr)
    assert [r["prefetch"] for r in res] == ["none", "oracle", "markov"]
    lib = simcache.simulate(simcache.read_trace(path), "lru", 2, prefetch="oracle", prefetch_width=2)
    assert res[1]["time_s"] == lib.time_s and res[1]["prefetches"] == lib.prefetches
    table = runner.invoke(main, ["simulate", str(path), "--capacity", "2", "--prefetch", "oracle"])
    assert table.exit_code == 0 and "stall ms/token" in table.output
    log = tmp_path / "d.parquet"
    assert runner.invoke(main, ["simulate", str(path), "--capacity", "2", "--prefetch", "oracle",
                                "--decisions", str(log)]).exit_code == 0
    sched = Schedule.from_dict(read_decisions(log).meta["prefetch"])
    rec = simcache.simulate(simcache.read_trace(path), "lru", 2, prefetch="oracle", record=True)
    assert sched.key.tolist() == rec.decisions.prefetch_schedule[:, 1].tolist() and sched.key.size > 0
    for args, message in (
        (["--prefetch", "lookahead"], "needs a trace with the 'lookahead' column"),
        (["--prefetch", "oracle", "--prefetch-width", "0"], "prefetch width must be an integer"),
        (["--prefetch", "oracle", "--no-overlap"], "prefetch needs a copy stream"),
    ):
        bad = runner.invoke(main, ["simulate", str(path), "--capacity", "2", *args])
        assert bad.exit_code == 1 and bad.output.startswith("Error: ") and message in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1
