"""The command line: driven through click's CliRunner, checked against the library."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import simcache
from simcache.cli import main

from .conftest import FLAME_RAW, TRACES, random_trace, require


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def error_line(result):
    """A failed command prints exactly one line, 'Error: ...', and no traceback."""
    assert result.exit_code != 0
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_simulate_default_trace_json_matches_library(flame):
    out = run("simulate", "--policy", "lru,belady-bypass", "--capacity", "8,16", "--json")
    data = json.loads(out.output)
    assert [(r["policy"], r["capacity"]) for r in data["results"]] == [
        ("lru", 8), ("lru", 16), ("belady-bypass", 8), ("belady-bypass", 16)]
    for rec in data["results"]:
        lib = simcache.simulate(flame, rec["policy"], rec["capacity"])
        assert (rec["hits"], rec["fills"], rec["bypasses"]) == (lib.hits, lib.fills, lib.bypasses)
        assert rec["time_per_token_s"] == pytest.approx(lib.time_per_token_s)


def test_simulate_table_per_layer_and_out(tmp_path):
    t = random_trace(9, layers=3)
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    out = run("simulate", path, "--policy", "markov", "--capacity", "2", "--per-layer",
              "--batch", "2", "--out", tmp_path / "r.parquet", "--threshold", "1/E")
    assert "markov (tau=0.167)" in out.output and "per layer:" in out.output
    frame = pq.read_table(tmp_path / "r.parquet").to_pandas()
    lib = simcache.simulate(t, "markov", 2, batch=2, threshold="1/E")
    assert frame.loc[0, "hits"] == lib.hits and frame.loc[0, "bypasses"] == lib.bypasses


def test_simulate_split_scores_only_test_requests(tmp_path):
    t = random_trace(10, requests=8)
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    data = json.loads(run("simulate", path, "--policy", "markov", "--capacity", "2", "--split", "0.5",
                          "--json").output)
    train, test = simcache.split_requests(t, 0.5, 0)
    lib = simcache.simulate(test, "markov", 2, prior=simcache.transition_counts(train))
    assert data["results"][0]["hits"] == lib.hits and data["results"][0]["accesses"] == lib.accesses
    assert "test requests" in data["notes"][0]


def test_prior_from_the_scored_trace_is_refused(tmp_path):
    path = simcache.write_trace(random_trace(11), tmp_path / "t.parquet")
    assert "separate trace" in error_line(run("simulate", path, "--prior", path, "--policy", "markov",
                                               "--capacity", "2", ok=False))


@pytest.mark.parametrize(
    "args,message",
    [
        (["simulate", "missing.parquet"], "not found"),
        (["simulate", "--policy", "mru"], "unknown policy 'mru'"),
        (["simulate", "--capacity", "0"], "capacity must be a positive integer"),
        (["simulate", "--capacity", "65"], "exceeds the 64 experts per layer"),
        (["simulate", "--threshold", "2"], "outside [0, 1]"),
        (["simulate", "--decisions", "d.parquet", "--capacity", "4,8"], "exactly one policy"),
        (["info", "pyproject.toml"], "not a Parquet file"),
        (["import", "nope.jsonl", "out.parquet"], "not found"),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(TRACES.parent)
    line = error_line(run(*args, ok=False))
    assert message in line


def test_bad_trace_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    assert "not a Parquet file" in error_line(run("simulate", bad, ok=False))


def test_info(flame):
    out = run("info", TRACES / "flame-moe-290m.parquet")
    assert "8 MoE layers x 64 experts, top-6" in out.output and "2,648 tokens" in out.output
    data = json.loads(run("info", TRACES / "flame-moe-290m.parquet", "--json").output)
    assert data["tokens"] == flame.num_tokens


def test_synth_then_simulate(tmp_path):
    out = tmp_path / "s.parquet"
    run("synth", out, "--requests", "3", "--length", "5:9", "--layers", "2", "--experts", "6", "--top-k", "2")
    t = simcache.read_trace(out)
    assert t.num_requests == 3 and t.num_layers == 2 and 15 <= t.num_tokens <= 27
    assert "exists" in error_line(run("synth", out, ok=False))


def test_import_flame(tmp_path):
    require(FLAME_RAW)
    out = tmp_path / "flame.parquet"
    run("import", FLAME_RAW, out)
    a, b = simcache.read_trace(out), simcache.read_trace(TRACES / "flame-moe-290m.parquet")
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.request, b.request)


def test_decisions_log(tmp_path):
    t = random_trace(12)
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    run("simulate", path, "--policy", "lru", "--capacity", "2", "--decisions", tmp_path / "d.parquet")
    from simcache.decisions import read_decisions

    log = read_decisions(tmp_path / "d.parquet")
    r = simcache.simulate(t, "lru", 2, record=True)
    np.testing.assert_array_equal(log.outcome, r.decisions.outcome)
    np.testing.assert_array_equal(log.slot, r.decisions.slot)
    np.testing.assert_array_equal(log.victim, r.decisions.victim)
    log.check_trace(t)
    with pytest.raises(simcache.SimcacheError, match="does not match"):
        log.check_trace(random_trace(13))
