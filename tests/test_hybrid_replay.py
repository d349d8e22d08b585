"""The host CPU executor and the host part of probe, on the CPU with tiny shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

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


@pytest.mark.parametrize("seed", range(4))
def test_host_executor_output_equals_the_gpu_path(seed):
    """CPU-assigned experts computed on the host, added into the output: the same values as
    the replay's own expert FFN on the device (here both the CPU, float32; thread counts
    differ, so the matmul blocking may round differently)."""
    x, jobs = _group(seed)
    ref = torch.zeros_like(x)
    for j in jobs:
        apply_expert(ref, x, j.idx, j.gate, j.weights, TINY.hidden, TINY.ffn)
    out = torch.zeros_like(x)
    with HostExecutor(TINY.hidden, TINY.ffn, CPU, threads=1, dtype=torch.float32) as ex:
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


def test_replay_refuses_a_cpu_decision_log_for_now(tmp_path):
    from .conftest import random_trace

    t = random_trace(5, layers=2, experts=5, requests=3, length=(12, 12))
    path = tmp_path / "t.parquet"
    simcache.write_trace(t, path)
    log = tmp_path / "d.parquet"
    r = CliRunner().invoke(main, ["simulate", str(path), "--policy", "lru", "--capacity", "2", "--miss", "cpu",
                                  "--decisions", str(log)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["replay", str(path), "--device", "cpu", "--preset", "custom", "--hidden", "16",
                                  "--ffn", "24", "--dtype", "float32", "--policy", "lru", "--capacity", "2",
                                  "--decisions", str(log), "--steps", "8"])
    assert r.exit_code == 1 and "replay runs --miss load decisions; this log was made with --miss cpu" in r.output
