"""Sweeps: every cell equals its simulate call; Dask (LocalCluster, and a scheduler with two
workers started as processes) gives the same rows; interrupted + resumed = uninterrupted;
the report and the winner agree with the Parquet; bad input is one line."""

from __future__ import annotations

import base64
import html.parser
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import simcache
from simcache.cli import main
from simcache.sweeps import KNOBS, build_grid, trace_hash, winner, winning_settings

from .conftest import ROOT, TRACES, random_trace

PYTHON = sys.executable
DASK = Path(PYTHON).with_name("dask")
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def error_line(result):
    assert result.exit_code != 0
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def bundled(n_requests=24):
    """The bundled traces, cut to their first requests (a few seconds for the whole grid)."""
    out = []
    for name in ("flame-moe-290m", "trained-mixtral-8e", "trained-olmoe-32e"):
        t = simcache.read_trace(TRACES / f"{name}.parquet")
        out.append(t.select_requests(np.unique(t.request)[:n_requests]))
    return out


COUNTERS = ("hits", "fills", "bypasses", "forced_bypasses", "evictions", "reloads", "accesses",
            "bytes_loaded", "compute_s", "transfer_s", "time_s", "time_per_token_s", "steps", "decode_tokens")


def test_every_cell_equals_its_simulate_call():
    traces = bundled()
    grid = dict(policy=["lru", "fifo", "belady-bypass", "markov"], capacity=[1, 2, 4], batch=[1, 3],
                scope=["layer", "global"], threshold=["0.1", "1/E"], prefill=["skip", "step"])
    frame = simcache.sweep(traces, workers=0, **grid)
    groups = build_grid(traces, grid)
    assert len(frame) == sum(len(g.cells) for g in groups) == 3 * 4 * 3 * 2 * 2 * 2 * 2
    assert set(frame["method"]) == {"stack", "direct"}  # LRU at capacity >= the largest group
    works = {}
    for row in frame.to_dict("records"):
        t = traces[[trace_hash(x) for x in traces].index(row["trace_hash"])]
        key = (row["trace_hash"], row["batch"], row["prefill"])
        if key not in works:
            works[key] = simcache.Workload(t, row["batch"], row["prefill"])
        threshold = "1/E" if row["policy"] == "markov" and row["threshold"] != 0.1 else 0.1
        lib = simcache.simulate(works[key], row["policy"], row["capacity"], scope=row["scope"],
                                threshold=threshold).to_dict()
        for name in COUNTERS:
            assert row[name] == lib[name], (name, row, lib[name])  # exact, times included
        assert row["threshold"] == lib["threshold"] or (row["threshold"] != row["threshold"] and lib["threshold"] is None)


def test_split_cells_use_the_prior_of_the_train_part():
    t = random_trace(3, requests=8)
    frame = simcache.sweep([t], workers=0, policy="markov", capacity=2, split=0.5, split_seed=4)
    train, test = simcache.split_requests(t, 0.5, 4)
    lib = simcache.simulate(test, "markov", 2, prior=simcache.transition_counts(train))
    assert frame.loc[0, "hits"] == lib.hits and frame.loc[0, "bypasses"] == lib.bypasses


def test_local_cluster_of_two_workers_gives_the_same_rows(tmp_path):
    small = simcache.write_trace(random_trace(2, requests=16), tmp_path / "t.parquet")
    traces = [TRACES / "flame-moe-290m.parquet", small]
    grid = dict(policy="lru,belady-bypass,markov", capacity="2,4", batch="1,4")
    serial = simcache.sweep(traces, workers=0, **grid)
    dask = simcache.sweep(traces, workers=2, out=tmp_path / "r.parquet", **grid)
    pd.testing.assert_frame_equal(serial, dask)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r.parquet"), dask)
    assert not (tmp_path / ".r.parquet.parts").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduler_with_two_worker_processes_gives_the_same_rows(tmp_path):
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(
                [str(DASK), "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        trace = simcache.write_trace(random_trace(8, requests=12), tmp_path / "t.parquet")
        args = ["sweep", trace, "--policy", "lru,fifo,belady", "--capacity", "2,3", "--batch", "1,2"]
        run(*args, "--scheduler", address, "--out", tmp_path / "remote.parquet")
        # in this process: the same rows as a LocalCluster (test above), without starting one
        run(*args, "--workers", "0", "--out", tmp_path / "local.parquet")
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "remote.parquet"),
                                      pd.read_parquet(tmp_path / "local.parquet"))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_unreachable_scheduler_fails_fast_and_writes_nothing(tmp_path):
    address = f"tcp://127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    r = run("sweep", TRACES / "flame-moe-290m.parquet", "--capacity", "2", "--scheduler", address,
            "--out", tmp_path / "r.parquet", ok=False)
    assert time.perf_counter() - start < 15
    assert address in error_line(r)
    assert list(tmp_path.iterdir()) == []


def _sweep_cmd(trace, out):
    return [PYTHON, "-m", "simcache", "sweep", str(trace), "--policy", "lru,fifo,belady-bypass",
            "--capacity", "2,4", "--batch", "1,2,3,4,5,6,7,8", "--workers", "0", "--out", str(out)]


def test_interrupted_sweep_resumes_to_the_same_parquet(tmp_path):
    t = simcache.synth(48, 300, num_layers=4, num_experts=16, top_k=2, seed=5, expert_bytes=1 << 20)
    trace = simcache.write_trace(t, tmp_path / "t.parquet")
    whole, cut = tmp_path / "whole.parquet", tmp_path / "cut.parquet"
    simcache.sweep([trace], workers=0, out=whole, policy="lru,fifo,belady-bypass", capacity="2,4",
                   batch="1,2,3,4,5,6,7,8")
    p = subprocess.Popen(_sweep_cmd(trace, cut), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / ".cut.parquet.parts"
    deadline = time.time() + 120
    while not (parts.is_dir() and any(parts.glob("*.parquet"))) and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    kept = pd.read_parquet(cut)  # a valid file holding what finished
    assert p.returncode != 0 and 0 < len(kept) < 48  # interrupted after some groups finished
    assert not parts.exists()
    again = subprocess.run(_sweep_cmd(trace, cut), env=ENV, check=True, capture_output=True, text=True)
    assert f"{48:,} cells" in again.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(cut), pd.read_parquet(whole))
    assert set(pd.read_parquet(cut)["cell"]) == set(pd.read_parquet(whole)["cell"])


def test_resume_skips_cells_already_present(tmp_path):
    t = random_trace(4)
    out = tmp_path / "r.parquet"
    first = simcache.sweep([t], workers=0, out=out, policy="lru,fifo", capacity=[1, 2])
    todo = []
    second = simcache.sweep([t], workers=0, out=out, policy="lru,fifo", capacity=[1, 2, 3], total=todo.append)
    assert todo == [2]  # only the new capacity's cells ran
    pd.testing.assert_frame_equal(second[second["capacity"] < 3].reset_index(drop=True), first)
    assert len(pd.read_parquet(out)) == 6


def test_toml_config_and_cli_options(tmp_path):
    path = simcache.write_trace(random_trace(5), tmp_path / "t.parquet")
    conf = tmp_path / "grid.toml"
    conf.write_text(f'traces = ["{path}"]\npolicy = ["lru", "belady"]\ncapacity = [1, 2]\n'
                    f'batch = [1, 2]\nout = "{tmp_path / "r.parquet"}"\nworkers = 0\n')
    r = run("sweep", "--config", conf, "--capacity", "2")  # the option overrides the file
    frame = pd.read_parquet(tmp_path / "r.parquet")
    assert sorted(set(frame["capacity"])) == [2] and len(frame) == 4
    assert "4 cells" in r.output


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    path = simcache.write_trace(random_trace(5), tmp_path / "t.parquet")
    out = tmp_path / "r.parquet"
    assert "no cells" in error_line(run("sweep", path, "--workers", "0", "--out", out, ok=False))
    assert "no cells" in error_line(run("sweep", "--capacity", "2", "--workers", "0", ok=False))
    conf = tmp_path / "bad.toml"
    conf.write_text('capacity = [2]\npolicies = ["lru"]\n')
    assert "unknown parameter 'policies'" in error_line(run("sweep", path, "--config", conf, ok=False))
    assert "outside 1..6" in error_line(run("sweep", path, "--capacity", "7", "--workers", "0", ok=False))
    assert "unknown policy" in error_line(run("sweep", path, "--capacity", "2", "--policy", "nope", ok=False))
    assert "cannot read" in error_line(run("sweep", path, "--capacity", "two", ok=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "t.parquet"]


def test_knobs_are_simulate_keywords():
    import inspect

    params = inspect.signature(simcache.simulate).parameters
    for k in KNOBS:
        assert k.workload or k.name in params, k.name


# ---- the report and the winner ------------------------------------------------------------------


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self.in_row = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "tr":
            self.rows.append([])
            self.in_row = True

    def handle_endtag(self, tag):
        if tag == "tr":
            self.in_row = False

    def handle_data(self, data):
        if self.in_row and data.strip():
            self.rows[-1].append(data.strip())


def test_report_has_every_figure_and_its_winners_agree_with_the_parquet(tmp_path):
    import matplotlib.image as mpimg

    traces = [TRACES / "flame-moe-290m.parquet", TRACES / "trained-mixtral-8e.parquet"]
    out = tmp_path / "r.parquet"
    simcache.sweep(traces, workers=0, out=out, policy="lru,belady,belady-bypass,markov", capacity="1,2,4")
    r = run("report", out, "--out", tmp_path / "rep")
    assert "index.html" in r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    parser = _Images()
    parser.feed(page)
    names = sorted(i["alt"] for i in parser.images)
    assert names == ["gap_decomposition", "hit_ratio_vs_capacity", "ms_per_token_vs_memory"]
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert (tmp_path / "rep" / f"{img['alt']}.png").read_bytes() == base64.b64decode(img["src"].split(",", 1)[1])
    frame = pd.read_parquet(out)
    table = [row for row in parser.rows if row[0] != "budget"]
    assert len(table) == 2 * 3  # per trace, one row per distinct memory budget
    for _, budget, policy, capacity, _, _, cell in table:
        row = frame[frame["cell"] == cell].iloc[0]
        same = frame[frame["trace_hash"] == row["trace_hash"]]
        fits = same[same["memory_bytes"] <= int(budget)]
        best = fits.sort_values(["time_per_token_s", "hit_ratio"], ascending=[True, False]).iloc[0]
        assert (best["policy"], best["capacity"]) == (row["policy"], row["capacity"]) == (policy.split()[0], int(capacity))


def test_winner_and_replay_settings(tmp_path):
    t = simcache.read_trace(TRACES / "trained-mixtral-8e.parquet")
    out = tmp_path / "r.parquet"
    frame = simcache.sweep([TRACES / "trained-mixtral-8e.parquet"], workers=0, out=out,
                           policy="lru,belady-bypass,markov", capacity="1,2,4", batch="1,2")
    budget = int(frame["memory_bytes"].sort_values().iloc[3])
    row, kwargs = winning_settings(out, t, budget)
    fits = frame[frame["memory_bytes"] <= budget]
    assert row["time_per_token_s"] == fits["time_per_token_s"].min()
    assert kwargs["policy"] == row["policy"] and kwargs["capacity"] == row["capacity"]
    lib = simcache.simulate(t, kwargs.pop("policy"), kwargs.pop("capacity"), **kwargs)
    assert lib.hits == row["hits"] and lib.time_per_token_s == row["time_per_token_s"]
    assert winner(out, "1TiB", batch=1)["batch"] == 1
    with pytest.raises(simcache.SimcacheError, match="no cell fits a budget of 0.00 GiB"):
        winner(out, 1000)
    with pytest.raises(simcache.SimcacheError, match="another trace"):
        winning_settings(out, random_trace(1), "1TiB")
    with pytest.raises(simcache.SimcacheError, match="budget looks like"):
        winner(out, "lots")


def test_replay_from_results_runs_the_winner_and_names_bad_input(tmp_path):
    pytest.importorskip("torch")
    t = random_trace(6)
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    out = tmp_path / "r.parquet"
    simcache.sweep([path], workers=0, out=out, policy="lru,belady-bypass", capacity="1,2")
    cpu = ["--device", "cpu", "--preset", "custom", "--hidden", "8", "--ffn", "8", "--dtype", "float32",
           "--steps", "6"]
    r = run("replay", path, *cpu, "--from", out, "--budget", "3MiB", "--json")
    data = __import__("json").loads(r.output[r.output.index("{"):])
    best = winner(out, "3MiB")
    assert [(x["policy"], x["capacity"]) for x in data["results"]] == [(best["policy"], best["capacity"])]
    other = simcache.write_trace(random_trace(7), tmp_path / "o.parquet")
    assert "another trace" in error_line(run("replay", other, *cpu, "--from", out, ok=False))
    assert "no cell fits" in error_line(run("replay", path, *cpu, "--from", out, "--budget", "1KiB", ok=False))
    assert "drop --capacity" in error_line(run("replay", path, *cpu, "--from", out, "--capacity", "2", ok=False))


def test_mrc_command_prints_and_plots(tmp_path):
    r = run("mrc", TRACES / "trained-mixtral-8e.parquet", "--plot", tmp_path / "c.png", "--out", tmp_path / "c.csv")
    curve = pd.read_csv(tmp_path / "c.csv")
    t = simcache.read_trace(TRACES / "trained-mixtral-8e.parquet")
    assert curve["hits"].tolist() == [simcache.simulate(t, "lru", c).hits for c in range(1, 9)]
    assert "stack" in r.output and (tmp_path / "c.png").stat().st_size > 1000
