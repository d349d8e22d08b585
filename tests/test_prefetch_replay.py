"""Replay-side prefetch (simcache.replay.prefetch) on the CPU with tiny shapes."""

from __future__ import annotations

import json

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


# ---- the harness: simcache replay --prefetch ------------------------------------------------

from click.testing import CliRunner  # noqa: E402

from simcache.cli import main  # noqa: E402
from simcache.replay import prefetch as rpf  # noqa: E402
from simcache.replay.harness import Replayer  # noqa: E402
from simcache.replay.presets import resolve  # noqa: E402
from simcache.simulator import PREFETCHED  # noqa: E402

from .conftest import random_trace  # noqa: E402
from .test_prefetch_plan import noisy_lookahead  # noqa: E402

TINY = resolve("custom", 16, 24)
STEPS = 14


@pytest.fixture(scope="module")
def replayer():
    t = noisy_lookahead(random_trace(4, layers=3, experts=6, requests=5, length=(10, 20)), 4)
    return Replayer(t, TINY, device="cpu", dtype="float32")


def timed_ids(r, L):
    """Group ids of a result's timed groups (after the two warm-up steps)."""
    return np.arange(2 * L, (2 + r.steps) * L)


@pytest.mark.parametrize("predictor,capacity,batch,scope", [
    ("oracle", 2, 1, "layer"), ("lookahead", 2, 3, "layer"), ("markov", 3, 2, "layer"), ("markov", 2, 1, "layer"),
    ("oracle", 5, 2, "global"), ("markov", 4, 1, "global")])
def test_prefetch_replay_equals_the_resident_run_and_issues_the_schedule(replayer, predictor, capacity, batch,
                                                                         scope):
    r = replayer.run("lru", capacity, scope=scope, batch=batch, steps=STEPS, verify=True, bypass_buffers=2,
                     prefetch=predictor, prefetch_width=2)
    assert r.verified is True and r.max_abs_diff == 0.0  # bitwise: the data came through the prefetches
    sim = simcache.simulate(simcache.Workload(replayer.trace, batch), "lru", capacity, scope=scope, record=True,
                            expert_bytes=replayer.expert_bytes, prefetch=predictor, prefetch_width=2)
    L = replayer.trace.num_layers
    ids = timed_ids(r, L)
    rows = sim.decisions.prefetch_schedule
    x = r.extra
    assert x["prefetch"] == predictor and x["prefetch_width"] == 2
    assert x["prefetches"] == x["prefetches_scheduled"] == int(np.isin(rows[:, 0], ids).sum()) > 0
    assert x["group_prefetches"] == [int((rows[:, 0] == g).sum()) for g in ids]
    assert x["prefetch_bytes"] == x["prefetches"] * replayer.expert_bytes
    # the prediction is the timeline's for exactly the replayed groups
    assert r.predicted_s == pytest.approx(float(sim.decisions.group_time[ids].sum()), rel=1e-12)
    assert x["predicted_stall_s"] == pytest.approx(float(sim.decisions.group_timeline[ids, 1].sum()), rel=1e-12)
    start = sim.decisions.group_timeline[ids, 0]
    assert np.allclose(x["group_predicted_start_s"], start - start[0], rtol=0, atol=1e-15)
    assert len(x["group_measured_start_s"]) == len(x["group_predicted_stall_s"]) == r.groups == len(ids)
    out = sim.decisions.outcome
    gp = simcache.Workload(replayer.trace, batch).demand.group_ptr
    timed_out = out[gp[ids[0]]: gp[ids[-1] + 1]]
    assert x["prefetched"] == int((timed_out == PREFETCHED).sum())
    assert r.hits == int((timed_out == 0).sum()) and r.hits + r.loads + x["prefetched"] == timed_out.size


def spy_schedules(monkeypatch) -> list:
    """(schedule, decisions) of every schedule the harness builds from now on."""
    seen = []
    original = Replayer.run.__globals__["build_schedule"]

    def spy(work, decisions, groups, *a, **kw):
        s = original(work, decisions, groups, *a, **kw)
        seen.append((s, decisions))
        return s

    monkeypatch.setitem(Replayer.run.__globals__, "build_schedule", spy)
    return seen


def test_outcome_5_computes_read_a_prefetch_buffer(replayer, monkeypatch):
    """An access served from a prefetch buffer computes on that buffer's row (after the slots
    and the ring), which only the prefetch copy fills: without the copies, replay notices."""
    r = replayer.run("lru", 2, steps=STEPS, verify=True, bypass_buffers=2, prefetch="markov", prefetch_width=2)
    assert r.extra["prefetched"] > 0 and r.verified
    seen = spy_schedules(monkeypatch)
    replayer.run("lru", 2, steps=STEPS, bypass_buffers=2, prefetch="markov", prefetch_width=2)
    s, dec = seen[-1]
    five = dec.outcome[s.access] == PREFETCHED
    assert five.any() and np.array_equal(s.buffer[five], s.n_slots + s.ring + dec.slot[s.access][five])
    assert not s.is_load()[five].any()  # no demand copy for them
    monkeypatch.setattr(rpf.Delivery, "issue", lambda self, g, before=None: 0)  # drop every prefetch copy
    with pytest.raises(simcache.SimcacheError, match="finds no prefetch"):
        replayer.run("lru", 2, steps=STEPS, bypass_buffers=2, prefetch="markov", prefetch_width=2)


def test_without_the_prefetch_copies_the_outputs_differ(replayer, monkeypatch):
    monkeypatch.setattr(rpf.Delivery, "issue", lambda self, g, before=None: 0)
    r = replayer.run("lru", 2, steps=STEPS, verify=True, bypass_buffers=2, prefetch="oracle", prefetch_width=2)
    assert r.verified is False


def test_no_prefetch_predicts_the_same_stall_rule(replayer):
    """Without prefetch the predicted stall and starts come from the per-expert rule; over every
    group (no warm-up) they add up to the simulator's stall, and the rule gives the timeline's
    own figures on a prefetch run."""
    r = replayer.run("lru", 2, warmup_steps=0, bypass_buffers=2)
    sim = simcache.simulate(replayer.trace, "lru", 2, record=True, expert_bytes=replayer.expert_bytes)
    assert r.extra["prefetches"] == 0 and r.extra["prefetch"] == "none"
    assert r.extra["predicted_stall_s"] == pytest.approx(sim.stall_s, rel=1e-9)
    work = simcache.Workload(replayer.trace)
    p = simcache.simulate(work, "lru", 2, record=True, expert_bytes=replayer.expert_bytes, prefetch="oracle")
    ids = np.arange(3, 30)
    start, stall = rpf.predicted_timeline(p.decisions, work, None, replayer.expert_bytes, ids, "per-expert")
    p.decisions.group_timeline, kept = None, p.decisions.group_timeline
    start2, stall2 = rpf.predicted_timeline(p.decisions, work, None, replayer.expert_bytes, ids, "per-expert")
    assert np.allclose(start, start2, rtol=0, atol=1e-15) and np.allclose(stall, stall2, rtol=0, atol=1e-15)
    assert np.array_equal(stall, kept[ids, 1])


def test_a_layer_subset_that_cuts_a_prefetch_off_is_refused(replayer):
    sub = Replayer(replayer.trace, TINY, device="cpu", dtype="float32", layers="0,2")
    with pytest.raises(simcache.SimcacheError, match="layer 1's groups prefetch experts of layer 2: replay layer 1"):
        sub.run("lru", 2, steps=STEPS, prefetch="oracle")
    whole = Replayer(replayer.trace, TINY, device="cpu", dtype="float32", layers="0-1")  # (layer 2's are dropped)
    r = whole.run("lru", 2, steps=STEPS, prefetch="oracle", verify=True)
    assert r.verified and 0 < r.extra["prefetches"] < r.extra["prefetches_scheduled"]


TINY_CLI = ["--device", "cpu", "--preset", "custom", "--hidden", "8", "--ffn", "8", "--dtype", "float32",
            "--steps", "8"]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    return simcache.write_trace(random_trace(5, layers=3, experts=6, requests=4, length=(8, 14)),
                                tmp_path_factory.mktemp("pf") / "t.parquet")


def test_cli_replays_a_list_of_predictors(trace_file):
    r = CliRunner().invoke(main, ["replay", str(trace_file), *TINY_CLI, "--prefetch", "none,oracle,markov",
                                  "--prefetch-width", "2", "--capacity", "2", "--verify", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)["results"]
    assert [x["prefetch"] for x in res] == ["none", "oracle", "markov"]
    assert all(x["verified"] for x in res) and res[1]["prefetches"] == res[1]["prefetches_scheduled"] > 0
    table = CliRunner().invoke(main, ["replay", str(trace_file), *TINY_CLI, "--prefetch", "oracle"])
    assert table.exit_code == 0 and "oracle w=2" in table.output and "stall ms measured / predicted" in table.output


def test_cli_replays_a_sweep_cell_with_its_prefetch(trace_file, tmp_path):
    out = tmp_path / "r.parquet"
    simcache.sweep([trace_file], workers=0, out=out, policy="lru", capacity="2", prefetch="oracle",
                   prefetch_width="3")
    r = CliRunner().invoke(main, ["replay", str(trace_file), *TINY_CLI, "--from", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])["results"]
    assert [(x["prefetch"], x["prefetch_width"]) for x in res] == [("oracle", 3)] and res[0]["prefetches"] > 0


@pytest.mark.parametrize("flags,message", [
    (["--prefetch", "oracle", "--issue", "fast"], "Error: --prefetch oracle replays on the eager issue path "
                                                  "(the timeline prices experts one by one): use --issue eager"),
    (["--prefetch", "oracle", "--prefetch-width", "0"], "Error: prefetch width must be an integer in [1, 6]"),
    (["--prefetch", "oracle", "--prefetch-width", "7"], "Error: prefetch width must be an integer in [1, 6]"),
    (["--prefetch", "sometimes"], "Error: unknown prefetch predictor 'sometimes'"),
])
def test_cli_refusals_are_one_line(trace_file, flags, message):
    if "fast" in flags and not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm: --issue fast is refused for that first")
    r = CliRunner().invoke(main, ["replay", str(trace_file), *TINY_CLI, *flags])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith(message), r.output


def test_a_decision_log_with_prefetch_is_replayed_and_checked(trace_file, tmp_path):
    log = tmp_path / "d.parquet"
    runner = CliRunner()
    made = runner.invoke(main, ["simulate", str(trace_file), "--policy", "lru", "--capacity", "2", "--prefetch",
                                "oracle", "--prefetch-width", "2", "--expert-bytes", str(3 * 8 * 8 * 4),
                                "--decisions", str(log)])
    assert made.exit_code == 0, made.output
    ok = runner.invoke(main, ["replay", str(trace_file), *TINY_CLI, "--decisions", str(log), "--verify", "--json"])
    assert ok.exit_code == 0, ok.output
    res = json.loads(ok.output)["results"][0]
    assert res["prefetch"] == "oracle" and res["prefetch_width"] == 2 and res["verified"]
    assert res["prefetches"] == res["prefetches_scheduled"] > 0
    bad = runner.invoke(main, ["replay", str(trace_file), *TINY_CLI, "--decisions", str(log), "--prefetch", "markov"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "differs from the replayed run's prefetch" in bad.output
    plain = tmp_path / "p.parquet"
    runner.invoke(main, ["simulate", str(trace_file), "--policy", "lru", "--capacity", "2", "--decisions", str(plain)])
    bad = runner.invoke(main, ["replay", str(trace_file), *TINY_CLI, "--decisions", str(plain), "--prefetch", "oracle"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1
    assert "the decision log was made with --prefetch none" in bad.output


def test_check_logged_compares_the_schedule():
    class D:
        prefetch_schedule = np.array([[0, 7, 1, -1], [1, 8, -1, 0]])

    logged = {"predictor": "oracle", "width": 2, "after": [0, 1], "key": [7, 8], "slot": [1, -1], "buffer": [-1, 0]}
    rpf.check_logged(logged, D)
    with pytest.raises(simcache.SimcacheError, match="other prefetches than the decision log"):
        rpf.check_logged(dict(logged, key=[7, 9]), D)


def test_a_prefetch_onto_a_row_its_group_reads_is_refused(replayer, monkeypatch):
    """The simulator pins the running group's experts, so no prefetch started during a group
    overwrites what it reads; the replay checks that before it runs."""
    seen = spy_schedules(monkeypatch)
    replayer.run("lru", 2, steps=STEPS, bypass_buffers=2)
    s, dec = seen[-1]
    L, E = replayer.trace.num_layers, replayer.trace.num_experts
    hit = next(c for c in range(s.access.shape[0]) if dec.outcome[s.access[c]] == 0)
    g = int(np.searchsorted(s.compute_ptr, hit, side="right") - 1)
    key = int(simcache.Workload(replayer.trace).demand.keys[s.access[hit]])
    bad = Schedule(np.array([s.step[g] * L + s.layer[g]]), np.array([key], np.int32),
                   np.array([dec.slot[s.access[hit]]], np.int32), np.array([-1], np.int32))
    weights = torch.zeros((s.num_buffers, 3))
    d = rpf.Delivery(bad, weights, s.num_buffers, torch.zeros((L * E, 3)), {key: 0}, dec,
                     simcache.Workload(replayer.trace).demand.keys, num_layers=L, num_experts=E, capacity=2,
                     per_layer=True, device=torch.device("cpu"))
    with pytest.raises(simcache.SimcacheError, match=f"overwrites row {int(s.buffer[hit])} while group"):
        d.bind(s, None)


@pytest.mark.parametrize("predictor,scope,capacity", [("markov", "layer", 2), ("oracle", "layer", 3),
                                                      ("oracle", "global", 5)])
def test_the_computes_that_wait_on_a_prefetch_come_last_among_the_hits(replayer, monkeypatch, predictor, scope,
                                                                        capacity):
    """delivered_accesses names exactly the computes that find a prefetch to wait on, and the
    schedule computes them after the group's other hits (as the timeline does)."""
    seen = spy_schedules(monkeypatch)
    found = []
    delivered = rpf.PrefetchIssuer.delivered

    def spy(self, key, buffer=-1):
        event, j = delivered(self, key, buffer)
        found.append(j >= 0)
        return event, j

    monkeypatch.setattr(rpf.PrefetchIssuer, "delivered", spy)
    r = replayer.run("lru", capacity, scope=scope, steps=STEPS, verify=True, bypass_buffers=2, prefetch=predictor,
                     prefetch_width=2)
    assert r.verified
    work = simcache.Workload(replayer.trace)
    sim = simcache.simulate(work, "lru", capacity, scope=scope, record=True, expert_bytes=replayer.expert_bytes,
                            prefetch=predictor, prefetch_width=2)
    L, E = replayer.trace.num_layers, replayer.trace.num_experts
    pf = rpf.replay_schedule(sim.decisions, list(range(L)), L, E, STEPS * L)
    late = rpf.delivered_accesses(sim.decisions, work.demand, pf, STEPS * L)
    expected = []
    for s, _ in seen[:2]:  # warm-up, timed (the resident reference has no prefetch)
        for g in range(s.num_groups):
            served = late[s.access[s.compute_ptr[g]: s.compute_ptr[g] + s.hits[g]]]
            assert not np.any(np.diff(served.astype(int)) < 0)  # the late ones last
            expected += served.tolist()
    assert found == expected and any(found)


from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from .strategies import traces  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(trace=traces(max_layers=3, max_experts=5, max_requests=3, max_len=8), data=st.data())
def test_any_prefetch_replay_equals_the_resident_run(trace, data):
    """On random traces, rules and scopes: outputs through the prefetch slots and buffers equal
    the all-resident run's bitwise, and the timed groups issue the simulator's prefetches."""
    work = simcache.Workload(trace, data.draw(st.integers(1, 3), label="batch"))
    assume(work.steps.num_steps >= 2)
    E, L = trace.num_experts, trace.num_layers
    scope = data.draw(st.sampled_from(["layer", "global"]), label="scope")
    capacity = data.draw(st.integers(1, E if scope == "layer" else L * E), label="capacity")
    predictor = data.draw(st.sampled_from(["oracle", "markov"]), label="predictor")
    width = data.draw(st.integers(1, E), label="width")
    policy = data.draw(st.sampled_from(["lru", "fifo", "markov"]), label="policy")
    rp = Replayer(trace, TINY, device="cpu", dtype="float32")
    r = rp.run(policy, capacity, scope=scope, batch=work.batch, verify=True, bypass_buffers=1, warmup_steps=1,
               prefetch=predictor, prefetch_width=width)
    assert r.verified is True
    rows = simcache.simulate(work, policy, capacity, scope=scope, record=True, expert_bytes=rp.expert_bytes,
                             prefetch=predictor, prefetch_width=width).decisions.prefetch_schedule
    assert r.extra["prefetches"] == int((rows[:, 0] >= L).sum())  # every group after the first step is timed
