"""The host CPU executor and the host part of probe, on the CPU with tiny shapes."""

from __future__ import annotations

import json
import threading
import time

import numpy as np

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import simcache  # noqa: E402
from simcache.cli import main  # noqa: E402
from simcache.errors import SimcacheError  # noqa: E402
from simcache.replay.cpu import HostExecutor, Job  # noqa: E402
from simcache.replay.experts import apply_expert  # noqa: E402
from simcache.replay.presets import resolve  # noqa: E402
from simcache.replay.probe import fit_roundtrip, host_threads, probe_host  # noqa: E402

TINY = resolve("custom", 16, 24)
CPU = torch.device("cpu")


def _group(seed, n=7, experts=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, TINY.hidden), generator=gen)  # (n, H)
    weights = [torch.randn(TINY.expert_elements(), generator=gen) * 0.2 for _ in range(experts)]  # (W,)
    jobs = []
    for w in weights:
        idx = torch.randperm(n, generator=gen)[: int(torch.randint(1, n + 1, (1,), generator=gen))]
        jobs.append(Job(w, idx, torch.rand((idx.numel(), 1), generator=gen)))
    return x, jobs


def _host_read(dst, src):
    """Stands in for the GPU's zero-copy kernel on a CPU-only run: dst <- src, poisoned
    first, so a result the worker wrote straight into dst would not survive."""
    dst.fill_(float("nan"))
    dst.copy_(src)


@pytest.mark.parametrize("upload", ["copy", "read"])
@pytest.mark.parametrize("seed", range(4))
def test_host_executor_output_equals_the_gpu_path(seed, upload):
    """CPU-assigned experts computed on the host, added into the output: the same values as
    the replay's own expert FFN on the device (here both the CPU, float32; thread counts
    differ, so the matmul blocking may round differently). Both ways of bringing results up:
    the worker's copies, and finish() reading the host buffer (as the GPU kernel does)."""
    x, jobs = _group(seed)
    ref = torch.zeros_like(x)
    for j in jobs:
        apply_expert(ref, x, j.idx, j.gate, j.weights, TINY.hidden, TINY.ffn)
    out = torch.zeros_like(x)
    with HostExecutor(TINY.hidden, TINY.ffn, CPU, threads=1, dtype=torch.float32) as ex:
        assert ex.upload == "copy"  # (no GPU: never the kernel)
        if upload == "read":
            ex._reader, ex.upload = _host_read, "read"
        ticket = ex.submit(x, jobs)
        ex.finish(ticket, out)
        assert len(ticket.expert_s) == len(jobs) and all(s > 0 for s in ticket.expert_s)
        assert ticket.path_s >= sum(ticket.expert_s)
        # a second group reuses the buffers
        x2, jobs2 = _group(seed + 100)
        out2, ref2 = torch.zeros_like(x2), torch.zeros_like(x2)
        for j in jobs2:
            apply_expert(ref2, x2, j.idx, j.gate, j.weights, TINY.hidden, TINY.ffn)
        ex.finish(ex.submit(x2, jobs2), out2)
        assert ex.submit(x2, []) is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2, ref2, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out, torch.zeros_like(out))


def test_checked_reader_keeps_only_a_kernel_that_copies_exactly():
    from simcache.replay.cpu import checked_reader

    def exact():
        return lambda dst, src: dst.copy_(src)

    def off_by_one_row():
        def read(dst, src):
            dst.copy_(src)
            dst[-1] = 0
        return read

    def fails():
        def read(dst, src):
            raise RuntimeError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")
        return read

    def one_way_only():  # copies the first block (host -> device), then leaves dst alone
        calls = []

        def read(dst, src):
            if not calls:
                dst.copy_(src)
            calls.append(1)
        return read

    assert checked_reader(CPU, make=exact) is not None
    assert checked_reader(CPU, make=off_by_one_row) is None
    assert checked_reader(CPU, make=one_way_only) is None  # the store into host memory is checked too
    assert checked_reader(CPU, make=fails) is None
    assert checked_reader(CPU, make=lambda: None) is None


def test_host_executor_refuses_overlapping_groups_and_oversized_ones():
    x, jobs = _group(0)
    with HostExecutor(TINY.hidden, TINY.ffn, CPU, threads=1, dtype=torch.float32, max_tokens=4) as ex:
        small = [Job(jobs[0].weights, jobs[0].idx[:2], jobs[0].gate[:2])]
        t = ex.submit(x, small)
        with pytest.raises(SimcacheError, match="finish a group's CPU work before"):
            ex.submit(x, small)
        ex.finish(t, torch.zeros_like(x))
        big = [Job(jobs[0].weights, torch.arange(5), torch.ones((5, 1)))]
        with pytest.raises(SimcacheError, match="sends 5 token rows to the CPU, more than the 4"):
            ex.submit(x, big)


def test_probe_host_on_tiny_shapes_gives_a_valid_cpu_table():
    host = probe_host(CPU, TINY, torch.float32, "1,2", tokens=[1, 4, 16], min_seconds=0.001)
    extra = host.pop("extra")
    cal = simcache.Calibration(device="t", copy_bytes=[1], copy_gbps=[1.0], ffn_tokens=[1], ffn_seconds=[1e-4], **host)
    cal.validate()
    assert cal.cpu_threads == sorted(set(host_threads("1,2")))
    assert cal.cpu_thread_choice in cal.cpu_threads
    assert cal.cpu_expert_bytes == TINY.expert_bytes(4) and cal.act_token_bytes == TINY.hidden * 4
    assert len(cal.cpu_seconds[0]) == 3 and len(extra["roundtrip_seconds"]) == 4
    assert cal.cpu_dtype == "float32" and "cores available" in cal.cpu_model
    assert 0 <= cal.cpu_group_s < 0.05 and extra["cpu_rounds"] == 3
    assert extra["group_issue_s"] > 0 and extra["cpu_handoff_executor_s"] >= 0
    assert cal.cpu_group_s == pytest.approx(extra["group_issue_s"] + extra["cpu_handoff_executor_s"])
    assert np.shape(extra["cpu_seconds_spread"]) == (2, 3, 2)
    assert all(b >= a for ra, rb in zip(cal.cpu_seconds, cal.cpu_busy_seconds) for a, b in zip(ra, rb))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 1e-2), st.floats(0.5, 3.0)), min_size=1, max_size=5))
def test_busy_from_pairs_keeps_the_paired_ratio_and_never_prices_the_cpu_faster(passes):
    """Each pass: an alone rate and busy/alone ratio. The busy figure is the alone median times
    the median ratio (at least 1), whatever the drift between passes."""
    from simcache.replay.probe import _median_of_passes, busy_from_pairs

    alone_t = [[[[a, a] for a, _ in passes]]]
    busy_t = [[[[a * r] for a, r in passes]]]
    alone = _median_of_passes(alone_t)[0][0]
    busy = busy_from_pairs(alone_t, busy_t)[0][0]
    ratio = float(np.median([r for _, r in passes]))
    assert busy >= alone
    assert busy == pytest.approx(alone * max(ratio, 1.0), rel=1e-9)


def test_handoff_probe_measures_the_executor_path_not_the_ffn(monkeypatch):
    """A hand-off slowed by 20 ms (the worker sleeps before the group's work) shows in the
    probe's figure; a slower FFN does not (the executor's own FFN clock is taken out)."""
    from simcache.replay import cpu as cpu_mod
    from simcache.replay.probe import host_handoff_seconds

    quick = host_handoff_seconds(CPU, TINY.hidden, torch.float32, 1, min_seconds=0.01, ffn_size=TINY.ffn)
    work = cpu_mod.HostExecutor._work
    monkeypatch.setattr(cpu_mod.HostExecutor, "_work", lambda self, *a: (time.sleep(20e-3), work(self, *a))[1])
    slow = host_handoff_seconds(CPU, TINY.hidden, torch.float32, 1, min_seconds=0.01, ffn_size=TINY.ffn)
    assert 15e-3 < slow - quick < 30e-3  # (medians: robust to a busy machine's odd slow call)
    monkeypatch.setattr(cpu_mod.HostExecutor, "_work", work)
    real_ffn = cpu_mod.ffn
    monkeypatch.setattr(cpu_mod, "ffn", lambda *a: (time.sleep(20e-3), real_ffn(*a))[1])
    assert host_handoff_seconds(CPU, TINY.hidden, torch.float32, 1, min_seconds=0.01, ffn_size=TINY.ffn) < quick + 5e-3


def test_fit_roundtrip_recovers_latency_and_bandwidth():
    tokens = [1, 16, 256, 2048]
    rt = [2 * (10e-6 + t * 8192 / 20e9) for t in tokens]
    latency, gbps = fit_roundtrip(tokens, rt, 8192)
    assert latency == pytest.approx(10e-6) and gbps == pytest.approx(20.0)


def test_host_threads_parses_and_rejects():
    assert host_threads("1") == [1]
    assert host_threads("all") == [max(host_threads("all"))]
    for bad, msg in (("x", "must look like 8,12,all"), ("0", "must be positive"), (",", "names no thread")):
        with pytest.raises(SimcacheError, match=msg):
            host_threads(bad)


def test_probe_cli_on_the_cpu_writes_a_calibration_with_host_tables(tmp_path):
    out = tmp_path / "cal.json"
    r = CliRunner().invoke(main, ["probe", "--device", "cpu", "--preset", "custom", "--hidden", "16",
                                  "--ffn", "24", "--dtype", "float32", "--cpu-threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "chosen: 1 threads" in r.output
    cal = simcache.load_calibration(out)
    assert cal.has_cpu and cal.cpu_threads == [1] and cal.device.startswith("host CPU only")
    assert json.loads(out.read_text())["cpu_dtype"] == "float32"
    r = CliRunner().invoke(main, ["probe", "--device", "cpu", "--no-cpu", "--preset", "custom", "--hidden", "16",
                                  "--ffn", "24"])
    assert r.exit_code == 1 and "measures only the host" in r.output


def _tiny_trace(seed=5):
    from .conftest import random_trace

    return random_trace(seed, layers=2, experts=5, requests=3, length=(12, 12))


def _cpu_heavy():
    """A calibration under which copies are slow and the host fast, so --miss auto sends
    misses to the CPU even for tiny experts (every group's misses exercise both paths)."""
    import dataclasses

    cal = simcache.default_calibration()
    return dataclasses.replace(cal, copy_gbps=[g / 1e6 for g in cal.copy_gbps])


@pytest.mark.parametrize("issue", ["eager", "fast"])
@pytest.mark.parametrize("miss", ["cpu", "auto"])
@pytest.mark.parametrize("policy", ["lru", "static"])
def test_replay_runs_cpu_experts_on_the_host_and_matches_the_simulator(issue, miss, policy):
    """The schedule follows the simulator's outcome codes: every CPU-assigned access of a
    replayed group runs on the host executor (one measured seconds figure each), the loads are
    the rest of the misses, and the outputs equal an all-resident run's."""
    if issue == "fast" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    from simcache.replay.harness import Replayer
    from simcache.simulator import CPU as CPU_OUTCOME, HIT

    t = _tiny_trace()
    rp = Replayer(t, TINY, device="cpu", dtype="float32", issue=issue)
    train = simcache.demand_counts(t)
    cal = _cpu_heavy()
    r = rp.run(policy, 2, batch=2, miss=miss, verify=True, calibration=cal, train_demand=train)
    work = simcache.Workload(t, 2)
    sim = simcache.simulate(work, policy, 2, miss=miss, calibration=cal, expert_bytes=rp.expert_bytes,
                            train_demand=train, record=True)
    gp, L = work.demand.group_ptr, t.num_layers
    timed = slice(int(gp[2 * L]), int(gp[work.steps.num_steps * L]))  # after the 2 warm-up steps
    out = sim.decisions.outcome[timed]
    assert r.cpu_experts == int((out == CPU_OUTCOME).sum()) > 0
    assert r.hits == int((out == HIT).sum())
    assert r.loads == out.size - r.hits - r.cpu_experts
    assert len(r.extra["cpu_expert_measured_s"]) == r.cpu_experts
    assert sum(r.extra["group_cpu_experts"]) == r.cpu_experts
    assert r.extra["cpu_tokens"] == int(work.demand.tokens[timed][out == CPU_OUTCOME].sum())
    assert all(s > 0 for s in r.extra["cpu_expert_measured_s"])
    assert r.verified and r.miss == miss
    assert r.predicted_s == pytest.approx(float(sim.decisions.group_time[2 * L: work.steps.num_steps * L].sum()))


def test_cpu_predicted_price_is_the_calibrations_per_expert():
    from simcache.hybrid import luts
    from simcache.replay.harness import Replayer

    t = _tiny_trace(7)
    rp = Replayer(t, TINY, device="cpu", dtype="float32")
    cal = _cpu_heavy()
    r = rp.run("lru", 2, batch=1, miss="cpu", calibration=cal)
    _, alone, busy, _, _ = luts(cal, rp.expert_bytes, 8)
    # --miss cpu never copies, so every CPU expert is priced at the alone rate
    assert r.extra["cpu_expert_predicted_s"] == [pytest.approx(float(alone[n])) for n in r.extra["cpu_expert_tokens"]]


def test_prediction_at_the_runs_ffn_rate_is_the_simulation_with_scaled_cpu_prices():
    """The replay re-prices the schedule that ran at the host FFN rate it ran at: the median of
    measured over priced FFN seconds, applied to the calibration. Under --miss cpu no rate moves
    an access, so it equals simulating again at that rate."""
    from simcache.replay.harness import Replayer

    t = _tiny_trace(7)
    rp = Replayer(t, TINY, device="cpu", dtype="float32")
    cal = _cpu_heavy()
    r = rp.run("lru", 2, batch=1, miss="cpu", calibration=cal)
    x = r.extra
    priced = [float(cal.cpu_seconds_for([n], rp.expert_bytes, busy=False)[0]) for n in x["cpu_expert_tokens"]]
    factor = float(np.median(np.asarray(x["cpu_expert_ffn_s"]) / np.asarray(priced)))
    assert x["cpu_rate_factor"] == pytest.approx(factor)
    work = simcache.Workload(t, 1)
    again = simcache.simulate(work, "lru", 2, miss="cpu", calibration=cal.cpu_scaled(factor),
                              expert_bytes=rp.expert_bytes, record=True)
    L, n = t.num_layers, work.steps.num_steps
    assert x["predicted_at_run_rate_s"] == pytest.approx(float(again.decisions.group_time[2 * L: n * L].sum()))
    with pytest.raises(SimcacheError, match="host FFN rate factor must be a positive number"):
        cal.cpu_scaled(float("nan"))


@pytest.mark.parametrize("miss", ["auto", "cpu"])
def test_at_run_rate_prices_the_schedule_that_ran(miss):
    """At factor 1 the re-pricing of every timed group's assignment is the simulator's own
    prediction; at another factor only the CPU path's FFN changes, and an auto schedule is
    kept (not chosen again)."""
    from simcache.replay.harness import _groups, at_run_rate
    from simcache.simulator import CPU as CPU_OUTCOME

    t = _tiny_trace(3)
    cal = _cpu_heavy()
    eb = 16 * 24 * 3 * 4
    work = simcache.Workload(t, 2)
    sim = simcache.simulate(work, "lru", 2, miss=miss, calibration=cal, expert_bytes=eb, record=True)
    L, n = t.num_layers, work.steps.num_steps
    timed = [g for g in _groups(work, range(L), n, L) if g[0] >= 2]
    out = sim.decisions.outcome
    assert (out == CPU_OUTCOME).any()
    assert at_run_rate(work, out, timed, cal, 1.0, eb) == pytest.approx(float(sim.decisions.group_time[2 * L: n * L].sum()))
    slower = at_run_rate(work, out, timed, cal, 3.0, eb)
    assert slower > at_run_rate(work, out, timed, cal, 1.0, eb)
    assert np.isnan(at_run_rate(work, out, timed, cal, float("nan"), eb))


def test_cpu_refresh_rescales_the_host_prices_and_keeps_the_probes_prediction(monkeypatch):
    """--cpu-refresh times the host FFN on the executor's worker, rescales the calibration's host
    prices by the mean measured / priced ratio, predicts from that; the prediction from the
    calibration as given is kept beside it."""
    import simcache.replay.probe as probe
    from simcache.replay.harness import Replayer

    t = _tiny_trace(7)
    rp = Replayer(t, TINY, device="cpu", dtype="float32")
    cal = _cpu_heavy()
    priced = cal.cpu_seconds_for([1, 16], rp.expert_bytes, busy=False)
    seen = []

    def three_times_the_price(preset, dtype, tokens, **kw):  # the host, measured: 3x the calibration
        seen.append((tokens, kw["experts"].shape[0], threading.current_thread().name))
        return list(3.0 * priced)

    monkeypatch.setattr(probe, "host_ffn_seconds", three_times_the_price)
    r = rp.run("lru", 2, batch=1, miss="cpu", calibration=cal, cpu_refresh=0.2)
    assert seen == [((1, 16), rp.store.host.shape[0], seen[0][2])] and seen[0][2].startswith("simcache-host")
    x = r.extra
    assert x["cpu_refresh_factor"] == pytest.approx(3.0)
    work = simcache.Workload(t, 1)
    L, n = t.num_layers, work.steps.num_steps

    def predicted(c):
        sim = simcache.simulate(work, "lru", 2, miss="cpu", calibration=c, expert_bytes=rp.expert_bytes, record=True)
        return float(sim.decisions.group_time[2 * L: n * L].sum())

    assert r.predicted_s == pytest.approx(predicted(cal.cpu_scaled(3.0)))
    assert x["predicted_from_probe_s"] == pytest.approx(predicted(cal))
    assert r.predicted_s > x["predicted_from_probe_s"]
    with pytest.raises(SimcacheError, match="--cpu-refresh needs a positive number of seconds"):
        rp.run("lru", 2, miss="cpu", calibration=cal, cpu_refresh=-1)
    plain = rp.run("lru", 2, miss="load", calibration=cal, cpu_refresh=0.2)  # nothing to refresh for load
    assert "cpu_refresh_factor" not in plain.extra and len(seen) == 1


@pytest.mark.parametrize("args, message", [
    (["--miss", "cpu", "--cpu-refresh", "-2"], "--cpu-refresh needs a positive number of seconds, got -2.0"),
    (["--miss", "cpu", "--cpu-refresh", "nan"], "--cpu-refresh needs a positive number of seconds, got nan"),
    (["--miss", "load", "--cpu-refresh", "2"], "--cpu-refresh re-times the host FFN for --miss cpu|auto runs"),
])
def test_replay_refuses_a_bad_cpu_refresh_before_running(tmp_path, args, message):
    t = _tiny_trace()
    path = tmp_path / "t.parquet"
    simcache.write_trace(t, path)
    r = CliRunner().invoke(main, ["replay", str(path), "--device", "cpu", "--preset", "custom", "--hidden", "16",
                                  "--ffn", "24", "--dtype", "float32", "--steps", "6", *args])
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_replay_follows_a_cpu_decision_log(tmp_path):
    t = _tiny_trace()
    path = tmp_path / "t.parquet"
    simcache.write_trace(t, path)
    log = tmp_path / "d.parquet"
    r = CliRunner().invoke(main, ["simulate", str(path), "--policy", "lru", "--capacity", "2", "--miss", "cpu",
                                  "--decisions", str(log)])
    assert r.exit_code == 0, r.output
    cli = ["replay", str(path), "--device", "cpu", "--preset", "custom", "--hidden", "16", "--ffn", "24",
           "--dtype", "float32", "--decisions", str(log), "--steps", "8"]
    r = CliRunner().invoke(main, [*cli, "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)["results"]
    assert row["miss"] == "cpu" and row["cpu_experts"] > 0 and row["loads"] == 0


def test_replay_cli_miss_list_and_split(tmp_path):
    t = _tiny_trace()
    path = tmp_path / "t.parquet"
    simcache.write_trace(t, path)
    cli = ["replay", str(path), "--device", "cpu", "--preset", "custom", "--hidden", "16", "--ffn", "24",
           "--dtype", "float32", "--steps", "6", "--policy", "lru,static", "--miss", "load,cpu",
           "--split", "0.5", "--capacity", "2"]
    r = CliRunner().invoke(main, cli)
    assert r.exit_code == 0, r.output
    assert "cpu experts" in r.output and r.output.count("static") == 2
    r = CliRunner().invoke(main, [*cli[:-6], "--miss", "sometimes"])
    assert r.exit_code == 1 and "--miss must be one of load, cpu, auto" in r.output


def test_replay_refuses_cpu_misses_with_quantised_experts():
    from simcache.replay.harness import Replayer

    rp = Replayer(_tiny_trace(), TINY, device="cpu", dtype="float32", expert_dtype="int4")
    with pytest.raises(SimcacheError, match="--miss cpu computes experts on the host in float32; it does not run "
                                            "with --expert-dtype int4"):
        rp.run("lru", 2, miss="cpu")


def test_replay_cpu_misses_need_a_cpu_table_and_static_needs_training_data():
    import dataclasses

    from simcache.replay.harness import Replayer

    rp = Replayer(_tiny_trace(), TINY, device="cpu", dtype="float32")
    bare = dataclasses.replace(simcache.default_calibration(), cpu_threads=[], cpu_tokens=[], cpu_seconds=[],
                               cpu_busy_seconds=[], cpu_copy_slowdown=[])
    with pytest.raises(SimcacheError, match="--miss cpu needs a CPU table"):
        rp.run("lru", 2, miss="cpu", calibration=bare)
    with pytest.raises(SimcacheError, match="eviction 'static' places the most-demanded experts of training data"):
        rp.run("static", 2)


def test_a_run9_replay_is_reproduced_and_priced_at_its_rate_golden():
    """docs/hybrid.md run 9b: the simulator, given the trace, --split 0.5 and the run's
    calibration, makes the decisions the H200 replay ran (the recorded prediction to 1e-9), and
    the schedule that ran, priced at the run's recorded FFN rate, is 4.3 % under the measured
    time (lru --miss auto, capacity 4, batch 16)."""
    import gzip
    from pathlib import Path

    from simcache.replay.harness import _groups, at_run_rate
    from simcache.transitions import demand_counts, split_requests, transition_counts

    root = Path(__file__).parents[1]
    run = root / "docs/replay-data/hybrid/run9b"
    with gzip.open(run / "hybrid-replay-mixtral-8x7b.json.gz", "rt") as f:
        (r,) = [x for x in json.load(f) if (x["policy"], x["miss"], x["capacity"], x["batch"]) == ("lru", "auto", 4, 16)]
    cal = simcache.load_calibration(run / "calib-hybrid-mixtral-8x7b.json")
    train, test = split_requests(simcache.read_trace(root / r["trace"]), 0.5, 0)
    work = simcache.Workload(test, 16)
    sim = simcache.simulate(work, "lru", 4, miss="auto", calibration=cal, expert_bytes=r["expert_bytes"], record=True,
                            prior=transition_counts(train), train_demand=demand_counts(train), seed=0)
    L = test.num_layers
    timed = [g for g in _groups(work, [0, 1, 2, 3], 30, L) if g[0] >= 2]
    out = sim.decisions.outcome
    assert at_run_rate(work, out, timed, cal, 1.0, r["expert_bytes"]) == pytest.approx(r["predicted_s"], rel=1e-9)
    at = at_run_rate(work, out, timed, cal, r["cpu_rate_factor"], r["expert_bytes"])
    assert round((at - r["measured_s"]) / r["measured_s"] * 100, 1) == -4.3
