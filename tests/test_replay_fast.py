"""The fast issue path on the CPU with tiny shapes: same outputs as the eager path, a constant
number of host calls per (step, layer), quantised experts, the grouped timing model, input checks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import simcache  # noqa: E402
from simcache.cli import main  # noqa: E402
from simcache.replay import experts as rx  # noqa: E402
from simcache.replay.harness import Replayer  # noqa: E402
from simcache.replay.issue import FastIssue, check_fast, grouped_ffn, split_weights  # noqa: E402
from simcache.replay.presets import PRESETS, resolve  # noqa: E402
from simcache.timing import group_seconds, grouped_ffn_seconds  # noqa: E402

from .conftest import random_trace  # noqa: E402

TINY = resolve("custom", 16, 24)


def outputs(trace, issue, policy, capacity, **kw):
    expert_dtype = kw.pop("expert_dtype", None)
    rp = Replayer(trace, TINY, device="cpu", dtype="float32", issue=issue, expert_dtype=expert_dtype,
                  layers=kw.pop("layers", None))
    return rp.run(policy, capacity, keep_outputs=True, **kw)


@pytest.mark.parametrize("policy,capacity,batch,scope", [("lru", 2, 1, "layer"), ("belady-bypass", 1, 4, "layer"),
                                                         ("fifo", 3, 3, "global"), ("markov", 2, 2, "layer")])
def test_fast_outputs_equal_the_eager_path(policy, capacity, batch, scope):
    t = random_trace(11, layers=2, experts=6, requests=4, length=(8, 14))
    eager = outputs(t, "eager", policy, capacity, batch=batch, scope=scope, steps=12, bypass_buffers=1)
    fast = outputs(t, "fast", policy, capacity, batch=batch, scope=scope, steps=12, bypass_buffers=1)
    assert len(fast.outputs) == len(eager.outputs) == fast.groups > 0
    assert (fast.hits, fast.loads, fast.bypasses) == (eager.hits, eager.loads, eager.bypasses)
    # float32 on the CPU: sums of k terms in another order; stated tolerance 1e-5 relative
    for a, b in zip(fast.outputs, eager.outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert fast.issue == "fast" and eager.issue == "eager"
    # the fast path holds a bypass buffer for every bypass of the busiest group; eager keeps 1
    assert eager.extra["ring_buffers"] == 1 and fast.extra["ring_buffers"] >= 1


@pytest.mark.parametrize("expert_dtype", [None, "int4", "fp8"])
def test_fast_outputs_equal_an_all_resident_run(expert_dtype):
    t = random_trace(12, layers=2, experts=5, requests=4, length=(10, 14))
    r = outputs(t, "fast", "belady-bypass", 2, batch=3, steps=10, verify=True, expert_dtype=expert_dtype)
    assert r.verified is True and r.max_abs_diff == 0.0
    e = outputs(t, "eager", "belady-bypass", 2, batch=3, steps=10, expert_dtype=expert_dtype)
    for a, b in zip(r.outputs, e.outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


class CallCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_fast_path_issues_a_constant_number_of_calls_per_group():
    t = random_trace(13, layers=2, experts=8, requests=6, length=(10, 16))
    rp = Replayer(t, TINY, device="cpu", dtype="float32", issue="fast")
    r = rp.run("lru", 3, batch=6, steps=8)
    experts = np.array(r.extra["group_experts"])
    assert experts.min() < experts.max()  # groups of different sizes
    # issue the timed schedule again and count the PyTorch calls of each group, copies aside
    from simcache.replay import harness

    sim, work, _ = harness._decide(rp, "lru", 3, "layer", 6, 0.1, None, None, None, None)
    groups = [g for g in harness._groups(work, rp.layers, 8, t.num_layers) if g[0] >= 2]
    n_slots = 3 * t.num_layers
    from simcache.replay.schedule import build_schedule, most_bypasses

    ring = max(4, most_bypasses(sim.decisions, groups))
    sched = build_schedule(work, sim.decisions, groups, rp.key_row, num_experts=t.num_experts, capacity=3,
                           scope="layer", n_slots=n_slots, ring=ring, experts=rp._experts, weights=rp._weights)
    weights = torch.zeros((n_slots + ring, rp.store.Q))
    x = harness._activations(work, TINY.hidden, torch.float32, rp.dev)
    issuer = FastIssue(sched, weights, rp.store.host, rp.store, x, rp.dev)
    from simcache.replay.measure import Meter

    meter = Meter(rp.dev, sched.num_groups, int(sched.is_load().sum()))
    counts, sizes = set(), set()
    for g in range(sched.num_groups):
        loads = len(sched.loads(g))
        hits = int(sched.hits[g])
        with CallCounter() as cc:
            issuer.group(g, meter)
        compute_calls = [c for c in cc.calls if c not in ("copy_", "__getitem__")]
        assert cc.calls.count("copy_") == loads  # one copy per load
        counts.add((hits > 0, loads > 0, len(compute_calls)))
        sizes.add(hits + loads)
    assert len(sizes) > 2
    # the call count depends only on whether the group has hits and loads, not on how many
    assert len({(h, l) for h, l, _ in counts}) == len(counts)


def test_quantised_formats():
    w = torch.randn(2, 3 * 16 * 24) * 16 ** -0.5
    for fmt, nbytes, tol in (("fp8", 3 * 16 * 24, 0.07), ("int4", 3 * 16 * 24 // 2, 0.6)):
        q = rx.quantise(w, fmt, torch.float32, 16)
        assert q.shape[1] * q.element_size() == nbytes
        back = rx.dequantise(q, fmt, torch.float32, 16)
        assert back.shape == w.shape
        assert float((back - w).norm() / w.norm()) < tol
    q = rx.quantise(torch.tensor([[-1.0, 0.0, 0.25, 1.75]]) * 16 ** -0.5 / 2, "int4", torch.float32, 16)
    # unit values -0.5, 0, 0.125, 0.875 -> x2 rounded -1, 0, 0, 2 -> stored +8, low nibble first
    assert q.tolist() == [[8 << 4 | 7, 10 << 4 | 8]]
    t = random_trace(14, layers=2, experts=4, requests=2, length=(8, 8))
    for fmt, per in ((None, 4), ("fp8", 1), ("int4", 0.5)):
        rp = Replayer(t, TINY, device="cpu", dtype="float32", expert_dtype=fmt)
        assert rp.expert_bytes == 3 * 16 * 24 * per


def test_grouped_ffn_is_per_expert_swiglu():
    h, f, n = 8, 12, 4
    w = torch.randn(n + 3, 3 * h * f)
    counts = [2, 0, 3, 1]
    x = torch.randn(sum(counts), h)
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    w13, w2 = split_weights(w[3:], h, f)
    got = grouped_ffn(x, w13, w2, offs, f)
    rows = np.concatenate([[0], np.cumsum(counts)])
    for i in range(n):
        a, b = rows[i], rows[i + 1]
        torch.testing.assert_close(got[a:b], rx.ffn(x[a:b], w[3 + i], h, f))


def naive_grouped(experts, tokens, table, n, total):
    """Slow twin of grouped_ffn_seconds: bilinear on the table, extrapolated as documented."""
    if n <= 0:
        return 0.0
    t = total / n
    scale = max(1.0, n / experts[-1])
    x = min(float(n), experts[-1])
    by_t = []
    for row in table:
        v = np.interp(t, tokens, row)
        if t > tokens[-1] and len(tokens) > 1:
            v = row[-1] + (row[-1] - row[-2]) / (tokens[-1] - tokens[-2]) * (t - tokens[-1])
        by_t.append(v)
    return max(0.0, float(np.interp(x, experts, by_t))) * scale


def test_grouped_time_model():
    experts = np.array([1.0, 4.0, 16.0])
    tokens = np.array([1.0, 8.0, 64.0])
    table = np.array([[10, 12, 30], [20, 25, 90], [60, 70, 300]], float) * 1e-6
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 40))
        total = int(rng.integers(n, n * 100 + 1)) if n else 0
        assert grouped_ffn_seconds(experts, tokens, table, n, total) == pytest.approx(
            naive_grouped(experts, tokens, table, n, total), rel=1e-12, abs=1e-15)
    assert grouped_ffn_seconds(experts, tokens, table, 4, 32) == pytest.approx(25e-6)
    assert grouped_ffn_seconds(experts, tokens, table, 32, 32) == pytest.approx(2 * 60e-6)
    g = grouped_ffn_seconds
    c, t = group_seconds(experts, tokens, table, 5e-6, 4, 4, 2, 2, 1e-3, True)
    assert t == pytest.approx(1e-3 + g(experts, tokens, table, 2, 2))
    assert c == pytest.approx(5e-6 + g(experts, tokens, table, 4, 4) + g(experts, tokens, table, 2, 2))
    c, t = group_seconds(experts, tokens, table, 5e-6, 4, 4, 2, 2, 1e-3, False)
    assert t == pytest.approx(c + 1e-3)
    c, t = group_seconds(experts, tokens, table, 5e-6, 4, 4, 0, 0, 0.0, True)
    assert t == pytest.approx(5e-6 + 20e-6)


def group_ffn(eb):
    return {"experts": [1, 4, 16], "tokens": [1, 8, 64], "seconds": [[10e-6, 12e-6, 30e-6], [20e-6, 25e-6, 90e-6],
                                                                      [60e-6, 70e-6, 300e-6]],
            "fixed_seconds": 4e-6, "expert_bytes": eb}


def test_simulator_prices_groups_with_the_grouped_table(tmp_path):
    t = random_trace(15, layers=3, experts=8, requests=4, length=(10, 20))
    eb = 1 << 20
    base = simcache.timing.default_calibration()
    cal = dataclasses.replace(base, group_ffn=group_ffn(eb))
    sim = simcache.simulate(t, "lru", 3, batch=4, expert_bytes=eb, calibration=cal, record=True)
    old = simcache.simulate(t, "lru", 3, batch=4, expert_bytes=eb, calibration=base, record=True)
    assert np.array_equal(sim.decisions.outcome, old.decisions.outcome)
    w = simcache.Workload(t, 4)
    d = w.demand
    n_e, n_t, table, fixed = cal.group_table(eb)
    t_copy = cal.copy_seconds(eb)
    for g in range(d.group_ptr.size - 1):
        lo, hi = d.group_ptr[g], d.group_ptr[g + 1]
        if lo == hi:
            continue
        miss = sim.decisions.outcome[lo:hi] != 0
        tok = d.tokens[lo:hi]
        first = fixed + naive_grouped(n_e, n_t, table, int((~miss).sum()), int(tok[~miss].sum()))
        later = naive_grouped(n_e, n_t, table, int(miss.sum()), int(tok[miss].sum()))
        assert sim.decisions.group_time[g] == pytest.approx(max(first, miss.sum() * t_copy) + later, rel=1e-9)
    # an old calibration file (no group_ffn) loads and keeps the per-expert model
    path = tmp_path / "old.json"
    data = json.loads(base.to_json())
    data.pop("group_ffn")
    path.write_text(json.dumps(data))
    loaded = simcache.load_calibration(path)
    assert loaded.group_ffn == {} and loaded.group_table(eb)[2].size == 0
    again = simcache.simulate(t, "lru", 3, batch=4, expert_bytes=eb, calibration=loaded, record=True)
    assert np.array_equal(again.decisions.group_time, old.decisions.group_time)
    # a broken table is a one-line error
    data["group_ffn"] = {"experts": [1, 4], "tokens": [1], "seconds": [[1.0]], "expert_bytes": eb}
    path.write_text(json.dumps(data))
    with pytest.raises(simcache.SimcacheError, match="group_ffn"):
        simcache.load_calibration(path)


def test_replay_prices_each_issue_path_with_its_model():
    t = random_trace(16, layers=2, experts=6, requests=3, length=(10, 12))
    rp_fast = Replayer(t, TINY, device="cpu", dtype="float32", issue="fast")
    eb = rp_fast.expert_bytes
    cal = dataclasses.replace(simcache.timing.default_calibration(), group_ffn=group_ffn(eb))
    fast = rp_fast.run("lru", 2, steps=8, calibration=cal)
    eager = Replayer(t, TINY, device="cpu", dtype="float32", issue="eager").run("lru", 2, steps=8, calibration=cal)
    assert fast.extra["timing_model"] == "grouped" and eager.extra["timing_model"] == "per-expert"
    plain = simcache.simulate(t, "lru", 2, expert_bytes=eb, calibration=simcache.timing.default_calibration(),
                              record=True)
    L = t.num_layers
    groups = [s * L + l for s in range(2, 8) for l in range(L)]
    assert eager.predicted_s == pytest.approx(float(plain.decisions.group_time[groups].sum()))
    assert fast.predicted_s != pytest.approx(eager.predicted_s)
    assert len(fast.extra["group_idle_s"]) == len(fast.extra["group_host_s"]) == fast.groups


def error_of(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    return r.output


def test_input_errors():
    from simcache.replay import ISSUE_PATHS
    from simcache.replay.issue import ISSUERS

    assert tuple(ISSUERS) == ISSUE_PATHS
    bad = CliRunner().invoke(main, ["replay", "--device", "cpu", "--issue", "graphs"])
    assert bad.exit_code == 2 and "Invalid value for '--issue'" in bad.output
    bad = CliRunner().invoke(main, ["replay", "--device", "cpu", "--expert-dtype", "int3"])
    assert bad.exit_code == 2 and "Invalid value for '--expert-dtype'" in bad.output
    assert "qwen3-30b-a3b has 128 experts per layer but the trace has 8" in error_of(
        "replay", "traces/trained-mixtral-8e.parquet", "--device", "cpu", "--preset", "qwen3-30b-a3b")
    assert "deepseek-v3 has 256 experts per layer but the trace has 64" in error_of(
        "replay", "traces/flame-moe-290m.parquet", "--device", "cpu", "--preset", "deepseek-v3")
    assert "probe measures a GPU" in error_of("probe", "--device", "cpu")
    cuda = torch.device("cuda", 0)
    with pytest.raises(simcache.SimcacheError, match="computes in bfloat16.*--issue eager"):
        check_fast(cuda, torch.float16, (9, 0))
    with pytest.raises(simcache.SimcacheError, match="compute capability 9.0 or newer.*8.0"):
        check_fast(cuda, torch.bfloat16, (8, 0))
    check_fast(cuda, torch.bfloat16, (9, 0))
    check_fast(torch.device("cpu"), torch.float32)
    with pytest.raises(simcache.SimcacheError, match="--issue must be one of"):
        Replayer(random_trace(1), TINY, device="cpu", issue="graphs")


def test_cli_fast_replay_on_the_cpu(tmp_path):
    t = random_trace(17, layers=2, experts=6, requests=3, length=(10, 12))
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["replay", str(path), "--device", "cpu", "--preset", "custom", "--hidden", "16",
                                  "--ffn", "24", "--dtype", "float32", "--issue", "fast", "--expert-dtype", "int4",
                                  "--policy", "lru,belady-bypass", "--capacity", "2", "--steps", "6", "--verify",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "issue fast" in r.output and r.output.count("equal") == 2
    rows = json.loads(out.read_text())
    assert [x["issue"] for x in rows] == ["fast", "fast"] and rows[0]["expert_dtype"] == "int4"
    assert rows[0]["expert_bytes"] == 3 * 16 * 24 // 2


def test_calibration_must_match_the_expert_format(tmp_path):
    t = random_trace(19, layers=2, experts=6, requests=2, length=(8, 8))
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    cal = dataclasses.replace(simcache.timing.default_calibration(), group_ffn=group_ffn(1 << 20))
    cal.save(tmp_path / "c.json")
    assert "probed with --expert-dtype none, this replay uses int4" in error_of(
        "replay", path, "--device", "cpu", "--preset", "custom", "--hidden", "16", "--ffn", "24", "--issue", "fast",
        "--expert-dtype", "int4", "--calibration", tmp_path / "c.json", "--steps", "5")


def test_new_presets():
    shapes = {name: (p.hidden, p.ffn, p.num_experts, p.top_k, p.num_layers) for name, p in PRESETS.items()}
    assert shapes["qwen3-30b-a3b"] == (2048, 768, 128, 8, 48)
    assert shapes["deepseek-v3"] == (7168, 2048, 256, 8, 58)
    assert shapes["gpt-oss-120b"] == (2880, 2880, 128, 4, 36)
    assert shapes["mixtral-8x22b"] == (6144, 16384, 8, 2, 56)
    assert {"mixtral-8x7b", "qwen-moe", "deepseek-v2-lite", "olmoe", "gpt-oss"} <= set(PRESETS)


def test_schedule_records_follow_the_decisions():
    from simcache.replay import harness
    from simcache.replay.schedule import build_schedule
    from simcache.simulator import FILL, HIT

    t = random_trace(18, layers=3, experts=6, requests=5, length=(8, 12))
    rp = Replayer(t, TINY, device="cpu", dtype="float32", layers="0,2")
    sim, work, _ = harness._decide(rp, "belady-bypass", 2, "layer", 3, 0.1, None, None, None, None)
    groups = harness._groups(work, rp.layers, 10, t.num_layers)
    sched = build_schedule(work, sim.decisions, groups, rp.key_row, num_experts=6, capacity=2, scope="layer",
                           n_slots=6, ring=3, experts=rp._experts, weights=rp._weights)
    d, dec = work.demand, sim.decisions
    assert sched.num_groups == len(groups) and sched.compute_ptr[-1] == sum(hi - lo for _, _, lo, hi in groups)
    seen_ring = []
    for g, (s, l, lo, hi) in enumerate(groups):
        cs = sched.computes(g)
        assert sorted(sched.access[cs.start:cs.stop]) == list(range(lo, hi))  # every access once
        outcome = dec.outcome[sched.access[cs.start:cs.stop]]
        h = int(sched.hits[g])
        assert (outcome[:h] == HIT).all() and (outcome[h:] != HIT).all()  # hits first
        for c in cs:
            i = int(sched.access[c])
            assert sched.store_row[c] == rp.key_row[int(d.keys[i])]
            if dec.outcome[i] in (HIT, FILL):
                assert sched.buffer[c] == l * 2 + dec.slot[i]
            else:
                seen_ring.append(sched.ring_of(c))
            r = sched.routes(c)
            assert r.stop - r.start == d.tokens[i]  # one route per routed token
            tok, pos = np.divmod(sched.route_dest[r], t.top_k)
            assert np.array_equal(tok, sched.route_token[r])
            step_tokens = work.steps.step_tokens[work.steps.step_ptr[s]: work.steps.step_ptr[s + 1]]
            assert (rp._experts[step_tokens[tok], l, pos] == int(d.keys[i]) - l * 6).all()
    assert seen_ring and seen_ring == [k % 3 for k in range(len(seen_ring))]  # handed out in rotation
    res = sched.resident()
    assert np.array_equal(res.buffer, sched.store_row) and np.array_equal(res.hits, np.diff(sched.compute_ptr))
