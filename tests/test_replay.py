"""The replay harness on the CPU with tiny shapes: outputs, decisions, memory and input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import simcache  # noqa: E402
from simcache.cli import main  # noqa: E402
from simcache.replay import experts as rx  # noqa: E402
from simcache.replay.harness import Replayer, parse_layers, replay  # noqa: E402
from simcache.replay.presets import PRESETS, resolve  # noqa: E402

from .conftest import random_trace  # noqa: E402

TINY = resolve("custom", 16, 24)


@pytest.mark.parametrize("policy,capacity,batch", [("lru", 2, 1), ("markov", 2, 3), ("belady-bypass", 1, 4),
                                                   ("fifo", 3, 2)])
def test_outputs_equal_an_all_resident_run(policy, capacity, batch):
    t = random_trace(4, layers=2, experts=6, requests=5, length=(10, 20))
    r = replay(t, TINY, policy, capacity, device="cpu", dtype="float32", batch=batch, verify=True,
               bypass_buffers=2, steps=25)
    assert r.verified is True and r.max_abs_diff == 0.0
    sim = simcache.simulate(t, policy, capacity, batch=batch, record=True)
    assert r.hits + r.loads == sum(r.extra["group_experts"])
    assert r.groups == len(r.extra["group_predicted_s"]) == 2 * (min(25, sim.steps) - 2)


@pytest.mark.parametrize("scope,capacity", [("layer", 2), ("global", 5)])
def test_static_placement_is_loaded_before_the_first_step(scope, capacity):
    """static's hot set is resident from the start (no fill ever loads it): the replay copies
    it into its slots, untimed, before the warm-up, so hits read the right weights."""
    t = random_trace(4, layers=2, experts=6, requests=5, length=(10, 20))
    demand = simcache.demand_counts(t)
    r = replay(t, TINY, "static", capacity, device="cpu", dtype="float32", scope=scope, verify=True,
               steps=12, train_demand=demand)
    assert r.verified is True and r.max_abs_diff == 0.0 and r.hits > 0


def test_replay_counts_match_the_simulator_for_the_replayed_steps():
    t = random_trace(5, layers=3, experts=5, requests=3, length=(12, 12))
    rp = Replayer(t, TINY, device="cpu", dtype="float32", layers="0,2")
    r = rp.run("lru", 2, steps=12)
    sim = simcache.simulate(t, "lru", 2, record=True, expert_bytes=rp.expert_bytes)
    w = simcache.Workload(t)
    gp = w.demand.group_ptr
    acc = np.concatenate([np.arange(gp[s * 3 + l], gp[s * 3 + l + 1]) for s in range(2, 12) for l in (0, 2)])
    assert r.hits == int((sim.decisions.outcome[acc] == 0).sum())
    assert r.layers == [0, 2] and r.expert_bytes == 3 * 16 * 24 * 4


def test_decision_log_is_followed_and_checked(tmp_path):
    t = random_trace(6)
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    runner = CliRunner()
    assert runner.invoke(main, ["simulate", str(path), "--policy", "lru", "--capacity", "2",
                                "--decisions", str(tmp_path / "d.parquet")]).exit_code == 0
    ok = runner.invoke(main, ["replay", str(path), "--device", "cpu", "--preset", "custom", "--hidden", "8",
                              "--ffn", "8", "--dtype", "float32", "--policy", "lru", "--capacity", "2",
                              "--steps", "6", "--decisions", str(tmp_path / "d.parquet"), "--verify"])
    assert ok.exit_code == 0, ok.output
    assert "equal" in ok.output
    bad = runner.invoke(main, ["replay", str(path), "--device", "cpu", "--preset", "custom", "--hidden", "8",
                               "--ffn", "8", "--policy", "lru", "--capacity", "3", "--steps", "6",
                               "--decisions", str(tmp_path / "d.parquet")])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1
    assert "--capacity 3 differs from the decision log's capacity 2" in bad.output
    other = simcache.write_trace(random_trace(7), tmp_path / "o.parquet")
    bad = runner.invoke(main, ["replay", str(other), "--device", "cpu", "--preset", "custom", "--hidden", "8",
                               "--ffn", "8", "--policy", "lru", "--capacity", "2", "--steps", "6",
                               "--decisions", str(tmp_path / "d.parquet")])
    assert bad.exit_code == 1 and "does not match the trace" in bad.output


TINY_CLI = ["--device", "cpu", "--preset", "custom", "--hidden", "8", "--ffn", "8", "--dtype", "float32",
            "--steps", "8"]


@pytest.mark.parametrize("flags", [
    ["--policy", "lru", "--capacity", "2", "--prefill", "step", "--batch", "2"],
    ["--policy", "random", "--capacity", "2", "--seed", "7"],
    ["--policy", "markov", "--capacity", "2", "--prior", "PRIOR", "--horizon", "2", "--threshold", "2/E"],
    ["--policy", "markov", "--capacity", "3", "--split", "0.5", "--seed", "3", "--scope", "global"],
    ["--policy", "fifo", "--admit", "markov", "--capacity", "2"],
], ids=["prefill-step", "seed", "prior", "split", "pair"])
def test_decision_log_replays_from_its_settings(tmp_path, flags):
    """A log made with any simulate settings replays given only the trace: the replay takes the
    log's settings, and its re-simulation makes exactly the logged decisions."""
    from simcache.decisions import read_decisions

    t = random_trace(8, layers=2, experts=6, requests=6, length=(10, 16), prompt=4)
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    prior = simcache.write_trace(random_trace(9, layers=2, experts=6, requests=4), tmp_path / "p.parquet")
    flags = [str(prior) if f == "PRIOR" else f for f in flags]
    log = tmp_path / "d.parquet"
    runner = CliRunner()
    made = runner.invoke(main, ["simulate", str(path), *flags, "--decisions", str(log)])
    assert made.exit_code == 0, made.output
    st = read_decisions(log).settings
    r = runner.invoke(main, ["replay", str(path), *TINY_CLI, "--decisions", str(log), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    (res,) = json.loads(r.output)["results"]
    assert (res["policy"], res["capacity"], res["batch"], res["scope"]) == (st.policy, st.capacity, st.batch,
                                                                             st.scope)
    assert res["verified"] is True
    # the replayed steps hold exactly the logged outcomes of those steps
    logged = read_decisions(log)
    g_end = 8 * 2
    assert res["hits"] + res["loads"] == int(logged.group_ptr[g_end] - logged.group_ptr[2 * 2])
    assert res["hits"] == int((logged.outcome[logged.group_ptr[4]:logged.group_ptr[g_end]] == 0).sum())


def test_decision_log_refuses_a_moved_or_changed_prior(tmp_path):
    t = random_trace(8, layers=2, experts=6, requests=6, length=(10, 16))
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    prior = simcache.write_trace(random_trace(9, layers=2, experts=6, requests=4), tmp_path / "p.parquet")
    log = tmp_path / "d.parquet"
    runner = CliRunner()
    assert runner.invoke(main, ["simulate", str(path), "--policy", "markov", "--capacity", "2", "--prior",
                                str(prior), "--decisions", str(log)]).exit_code == 0
    moved = prior.rename(tmp_path / "moved.parquet")
    assert "not found" in error_of("replay", path, *TINY_CLI, "--decisions", log)
    assert runner.invoke(main, ["replay", str(path), *TINY_CLI, "--decisions", str(log),
                                "--prior", str(moved)]).exit_code == 0
    other = simcache.write_trace(random_trace(10, layers=2, experts=6, requests=4), tmp_path / "o.parquet")
    out = error_of("replay", path, *TINY_CLI, "--decisions", log, "--prior", other)
    assert "is not the one the decision log was made with" in out
    assert "--prior is for a --decisions log" in error_of("replay", path, *TINY_CLI, "--prior", other)


def error_of(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    return r.output


def test_gpu_errors_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in error_of("replay", "--gpu", "0", "--steps", "5")
    assert "no CUDA device" in error_of("probe", "--gpu", "1")


def test_missing_gpu_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "no such GPU (1 found)" in error_of("replay", "--gpu", "3", "--steps", "5")


def test_preset_must_match_the_trace():
    assert "deepseek-v2-lite has 64 experts per layer but the trace has 8" in error_of(
        "replay", "traces/trained-mixtral-8e.parquet", "--device", "cpu", "--preset", "deepseek-v2-lite")
    assert "unknown preset" in error_of("replay", "--device", "cpu", "--preset", "nope")


def test_memory_is_checked_up_front(monkeypatch):
    t = random_trace(8, layers=3, experts=6)
    monkeypatch.setattr("simcache.replay.harness.host_available_bytes", lambda: 10_000)
    with pytest.raises(simcache.SimcacheError, match="pinned host memory.*--layers"):
        Replayer(t, TINY, device="cpu", dtype="float32")
    monkeypatch.setattr("simcache.replay.harness.host_available_bytes", lambda: 1 << 40)
    monkeypatch.setattr("simcache.replay.harness.gpu_free_bytes", lambda dev: 1000)
    rp = Replayer(t, TINY, device="cpu", dtype="float32")
    with pytest.raises(simcache.SimcacheError, match="GPU memory"):
        rp.run("lru", 4, steps=5)


def test_layers_and_presets():
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert parse_layers(None, 3) == [0, 1, 2]
    with pytest.raises(simcache.SimcacheError, match="outside"):
        parse_layers("7", 4)
    with pytest.raises(simcache.SimcacheError, match="look like"):
        parse_layers("a-b", 4)
    mix = PRESETS["mixtral-8x7b"]
    assert mix.expert_bytes() == 3 * 4096 * 14336 * 2 == simcache.timing.MIXTRAL_EXPERT_BYTES


def test_ffn_is_swiglu():
    h, f = 4, 6
    w = torch.randn(3 * h * f)
    x = torch.randn(5, h)
    w1, w3, w2 = w[: f * h].view(f, h), w[f * h: 2 * f * h].view(f, h), w[2 * f * h:].view(h, f)
    ref = (torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()
    torch.testing.assert_close(rx.ffn(x, w, h, f), ref)
