"""The error contract, case by case: every bad input answers with one line and exit 1 (click's
usage errors: exit 2), leaves its inputs as they were, and leaves no temporary file behind once
the next run has cleaned up; interrupted runs write nothing. Inputs are generated here.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import simcache
from simcache import SimcacheError
from simcache._files import atomic_output, reserve, release
from simcache.analysis import analyze
from simcache.cli import main
from simcache.trace import COLUMNS, FIELDS

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers --------------------------------------------------------------------------------


def invoke(*args, cwd=None):
    start = time.perf_counter()
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    result.seconds = time.perf_counter() - start
    return result


def error_of(result, code=1) -> str:
    """The one 'Error: ...' line of a failed command (click's usage errors: exit 2, with their
    'Usage:' lines above it)."""
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and "Warning" not in out and "Aborted" not in out, out
    lines = [l for l in out.strip().splitlines() if l.strip()]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: "), out
    else:
        assert lines[0].startswith("Usage:") and lines[-1].startswith("Error: "), out
    return lines[-1]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def write_table(path, table, meta):
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    pq.write_table(table.replace_schema_metadata({b"simcache": raw}), path)
    return path


def with_column(table, name, array):
    return table.set_column(table.schema.get_field_index(name), name, array)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A folder of good and bad inputs, all generated; the test runs inside it."""
    monkeypatch.chdir(tmp_path)
    t = simcache.synth(4, 20, num_layers=2, num_experts=8, top_k=2, seed=0, expert_bytes=1 << 20)
    simcache.write_trace(t, tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    meta = json.loads(table.schema.metadata[b"simcache"])
    write_table(tmp_path / "meta-list.parquet", table, [1, 2])
    write_table(tmp_path / "experts-str.parquet", table, {**meta, "num_experts": "8"})
    write_table(tmp_path / "bytes-str.parquet", table, {**meta, "expert_bytes": "x"})
    phase = table.column("phase").to_numpy().astype(np.int64)
    phase[5] = 257
    write_table(tmp_path / "phase-257.parquet", with_column(table, "phase", pa.array(phase)), meta)
    layer = table.column("layer").to_numpy().astype(np.int64) + 65536
    write_table(tmp_path / "layer-65536.parquet", with_column(table, "layer", pa.array(layer)), meta)
    req = table.column("request").to_pylist()
    req[-1] = None
    write_table(tmp_path / "null-request.parquet", with_column(table, "request", pa.array(req, pa.int64())), meta)
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    one = simcache.synth(4, 1, num_layers=2, num_experts=8, top_k=2, seed=0)  # no transitions at all
    simcache.write_trace(one, tmp_path / "one-token.parquet")
    simcache.write_trace(simcache.synth(3, 9, num_layers=2, num_experts=8, seed=1), tmp_path / "p.parquet")
    counts = simcache.transition_counts(t)
    np.save(tmp_path / "c.npy", counts)
    np.save(tmp_path / "str.npy", np.full((2, 8, 8), "a"))
    np.save(tmp_path / "complex.npy", counts.astype(complex))
    np.save(tmp_path / "huge.npy", np.full((2, 8, 8), 1e308))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "ids.jsonl").write_text(json.dumps({"request": 0, "position": 0, "layer": 0,
                                                    "experts": [2.9, 3.9]}) + "\n")
    (tmp_path / "old.json").write_text("[]\n")
    os.link(tmp_path / "t.parquet", tmp_path / "link.parquet")
    (tmp_path / "dir").mkdir()
    before = snapshot(tmp_path)
    yield tmp_path
    release()
    after = snapshot(tmp_path)
    for name, digest in before.items():  # no input changed or vanished
        assert after.get(name) == digest, f"{name} changed"
    assert temporaries(tmp_path) == []


# ---- every case of the issue: one line, exit 1 (or 2 for usage), inputs unchanged -------------

CASES = [
    # tracebacks before
    (["info", "meta-list.parquet"], "must be a JSON object"),
    (["simulate", "meta-list.parquet"], "must be a JSON object"),
    (["analyze", "meta-list.parquet"], "must be a JSON object"),
    (["replay", "meta-list.parquet", "--device", "cpu"], "must be a JSON object"),
    (["info", "experts-str.parquet"], "'num_experts' must be an integer"),
    (["simulate", "experts-str.parquet"], "'num_experts' must be an integer"),
    (["analyze", "experts-str.parquet"], "'num_experts' must be an integer"),
    (["replay", "experts-str.parquet", "--device", "cpu"], "'num_experts' must be an integer"),
    (["info", "bytes-str.parquet"], "'expert_bytes' must be an integer"),
    (["simulate", "bytes-str.parquet"], "'expert_bytes' must be an integer"),
    (["simulate", "t.parquet", "--expert-bytes", "99999999999999999999"], "--expert-bytes", 2),
    (["simulate", "t.parquet", "--seed", "-1"], "--seed", 2),
    (["synth", "s.parquet", "--seed", "-1"], "--seed", 2),
    (["synth", "s.parquet", "--transitions", "str.npy"], "must hold real numbers"),
    (["analyze", "huge.npy"], "exceeds 2^53"),
    # "Aborted!" before
    (["analyze", "empty.npy"], "not a numpy array"),
    (["simulate", "t.parquet", "--policy", "markov", "--prior", "empty.npy"], "not a numpy array"),
    (["synth", "s.parquet", "--transitions", "empty.npy"], "not a numpy array"),
    # inputs destroyed before
    (["simulate", "t.parquet", "--out", "t.parquet"], "is the input t.parquet"),
    (["simulate", "t.parquet", "--decisions", "t.parquet"], "is the input t.parquet"),
    (["simulate", "t.parquet", "--policy", "markov", "--prior", "p.parquet", "--out", "p.parquet"],
     "is the input p.parquet"),
    (["simulate", "t.parquet", "--out", "link.parquet", "--force"], "is the input t.parquet"),
    (["simulate", "t.parquet", "--out", "old.json"], "exists: old.json (use --force"),
    (["simulate", "t.parquet", "--out", "r.parquet", "--decisions", "r.parquet"], "already another output"),
    (["synth", "t.parquet", "--force", "--transitions", "t.parquet"], "is the input"),
    (["import", "ids.jsonl", "ids.jsonl"], "must end in .parquet"),
    (["mrc", "t.parquet", "--out", "t.parquet", "--force"], "is the input t.parquet"),
    (["mrc", "t.parquet", "--plot", "t.parquet", "--force"], "--plot must end in .png"),
    (["mrc", "t.parquet", "--out", "old.json"], "exists: old.json (use --force"),
    # hangs before
    (["replay", "t.parquet"], "needs --gpu N"),
    (["replay", "t.parquet", "--device", "cpu", "--preset", "mixtral-8x7b"], "--cpu-full-size"),
    (["analyze", "t.parquet", "--null", "100000000000"], "--null", 2),
    # silent misreads before
    (["info", "phase-257.parquet"], "column 'phase' has value 257 outside [0, 1]"),
    (["info", "layer-65536.parquet"], "column 'layer' has value 6553"),
    (["info", "null-request.parquet"], "column 'request' has 1 null rows"),
    (["import", "ids.jsonl", "i.parquet"], "column 'experts' must hold integer expert ids"),
    (["simulate", "one-token.parquet", "--policy", "markov", "--split", "0.5"], "the prior would be empty"),
    (["simulate", "t.parquet", "--policy", "markov", "--prior", "huge.npy"], "exceeds 2^53"),
    (["synth", "s.parquet", "--transitions", "huge.npy"], "exceeds 2^53"),
    (["synth", "s.parquet", "--transitions", "c.npy", "--layers", "5", "--experts", "16"],
     "drop --layers, --experts"),
    # values that made unusable files
    (["synth", "s.parquet", "--expert-bytes", "0"], "--expert-bytes", 2),
    (["synth", "s.parquet", "--expert-bytes", "-1"], "--expert-bytes", 2),
    (["import", "ids.jsonl", "i.parquet", "--expert-bytes", "0"], "--expert-bytes", 2),
    (["synth", "s.parquet", "--prompt-length", "-1"], "--prompt-length", 2),
    (["capture", "--model", "nowhere", "--text", "ids.jsonl", "--prompt-tokens", "-3"], "--prompt-tokens", 2),
    (["capture", "--model", "nowhere", "--text", "ids.jsonl", "--max-length", "8", "--prompt-tokens", "8"],
     "leaves no decode tokens"),
    (["analyze", "complex.npy"], "must hold real numbers, got dtype complex128"),
    # binary where text goes, a pipe where a file goes
    (["sweep", "t.parquet", "--config", "t.parquet", "--capacity", "2"], "t.parquet is not valid TOML (not UTF-8"),
    (["capture", "--model", "nowhere", "--generate", "2", "--prompts-file", "t.parquet"],
     "prompts file t.parquet is not UTF-8 text"),
    (["synth", "s.parquet", "--transitions", "complex.npy"], "must hold real numbers"),
    # late validation before: the output is refused before the (corrupt) trace is read
    (["simulate", "corrupt.parquet", "--out", "nodir/r.json"], "directory does not exist: nodir"),
    (["simulate", "corrupt.parquet", "--out", "r.txt"], "--out must end in .parquet, .csv or .json"),
    (["simulate", "corrupt.parquet", "--decisions", "d.csv"], "--decisions must end in .parquet"),
    (["simulate", "corrupt.parquet", "--out", "/proc/r.json"], "cannot write --out in /proc"),
    (["replay", "corrupt.parquet", "--device", "cpu", "--out", "nodir/r.json"], "directory does not exist"),
    (["probe", "--out", "nodir/cal.json"], "directory does not exist"),
    (["mrc", "corrupt.parquet", "--out", "nodir/m.json"], "--out directory does not exist: nodir"),
    (["analyze", "corrupt.parquet", "--plots", "old.json"], "is a file", 2),
    (["analyze", "corrupt.parquet", "--plots", "figs"], "not a Parquet file"),
    # usage errors: click's three lines, exit 2
    (["simulate", "t.parquet", "--capacity", "abc"], "expected integers", 2),
    (["simulate", "dir"], "is a directory", 2),
    (["simulate", "t.parquet", "--scope", "pool"], "--scope", 2),
    (["simulate", "t.parquet", "--batch", "0"], "batch must be a positive integer", 1),
    (["simulate", "t.parquet", "--horizon", "0"], "--horizon", 2),
]


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_and_destroys_nothing(case, files):
    args, message, code = case if len(case) == 3 else (*case, 1)
    if args[0] in ("replay", "probe"):
        pytest.importorskip("torch")
    result = invoke(*args)
    assert message in error_of(result, code)
    assert result.seconds < 30


def test_existing_output_is_replaced_only_with_force(files):
    assert "use --force" in error_of(invoke("synth", "t.parquet", "--requests", "2"))
    invoke("simulate", "t.parquet", "--out", "r.json")
    first = (files / "r.json").read_text()
    assert "use --force" in error_of(invoke("simulate", "t.parquet", "--out", "r.json", "--capacity", "3"))
    assert (files / "r.json").read_text() == first
    assert invoke("simulate", "t.parquet", "--out", "r.json", "--capacity", "3", "--force").exit_code == 0
    assert json.loads((files / "r.json").read_text())[0]["capacity"] == 3


def test_existing_report_is_replaced_only_with_force(files):
    assert invoke("sweep", "t.parquet", "--capacity", "2", "--workers", "0", "--out", "sw.parquet").exit_code == 0
    assert invoke("report", "sw.parquet", "--out", "rep").exit_code == 0
    first = snapshot(files / "rep")
    (files / "rep" / "index.html").write_text("kept")
    assert "rep/hit_ratio_vs_capacity.png (use --force" in error_of(invoke("report", "sw.parquet", "--out", "rep"))
    assert (files / "rep" / "index.html").read_text() == "kept" and temporaries(files / "rep") == []
    assert invoke("report", "sw.parquet", "--out", "rep", "--force").exit_code == 0
    assert snapshot(files / "rep") == first


def test_fifo_is_refused_without_blocking(files):
    os.mkfifo(files / "fifo.parquet")
    os.mkfifo(files / "fifo.npy")
    os.mkfifo(files / "fifo.toml")
    for args in (["info", "fifo.parquet"], ["analyze", "fifo.npy"],
                 ["simulate", "t.parquet", "--policy", "markov", "--prior", "fifo.npy"],
                 ["report", "fifo.parquet", "--out", "rep"], ["sweep", "t.parquet", "--config", "fifo.toml"]):
        proc = subprocess.run([sys.executable, "-m", "simcache", *args], cwd=files, env=_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert "not a regular file" in proc.stderr


def test_long_horizon_and_big_batch_are_bounded_and_noted(files):
    t = simcache.read_trace(files / "t.parquet")
    simcache.simulate(t, "markov", 2, admit="markov-h", horizon=1)  # compile first: time the run alone
    r = invoke("simulate", "t.parquet", "--policy", "markov", "--admit", "markov-h", "--horizon", "10000000",
               "--batch", "1000", "--capacity", "2", "--json")
    assert r.exit_code == 0 and r.seconds < 30
    data = json.loads(r.output)
    assert any("effective batch is 4" in n for n in data["notes"])
    assert any("--horizon 10000000 is cut to the trace's" in n for n in data["notes"])
    steps = simcache.simulate(t, "markov", 2, admit="markov-h", batch=1000).steps
    clamped = simcache.simulate(t, "markov", 2, admit="markov-h", batch=1000, horizon=steps)
    assert data["results"][0]["hits"] == clamped.hits
    table = invoke("simulate", "t.parquet", "--batch", "1000").output
    assert "workload: batch 4," in table


def test_analyze_warns_with_a_time_estimate():
    seen = []
    block = np.ones((1, 4, 4)) * 10
    analyze(block, null_samples=5, estimate=seen.append)
    assert len(seen) == 1 and seen[0] >= 0


# ---- the Python API ------------------------------------------------------------------------

API = [
    (dict(seed=-1), "seed must be a non-negative integer, got -1"),
    (dict(seed=1.5), "seed must be a non-negative integer, got 1.5"),
    (dict(threshold=None), "threshold must be a number, got None"),
    (dict(policy=["lru"]), "policy must be a string"),
    (dict(calibration="x.json"), "calibration must be a Calibration"),
    (dict(expert_bytes=1.5), "expert_bytes must be a positive integer, got 1.5"),
    (dict(capacity=2.0), "capacity must be a positive integer, got 2.0"),
    (dict(horizon=True), "horizon must be a positive integer, got True"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(prior=np.full((2, 8, 8), "a")), "must hold real numbers"),
    (dict(record="yes"), "record must be True or False"),
]


@pytest.mark.parametrize("kwargs,message", API, ids=[str(k) for k, _ in API])
def test_simulate_refuses_bad_arguments(kwargs, message):
    t = simcache.synth(2, 6, num_layers=2, num_experts=8, seed=0)
    args = {"policy": "lru", "capacity": 2, **kwargs}
    with pytest.raises(SimcacheError, match=message.replace("(", r"\(")) as exc:
        simcache.simulate(t, **args)
    assert "\n" not in str(exc.value)


def test_other_entry_points_refuse_bad_arguments(tmp_path):
    from simcache.workload import Workload

    simcache.write_trace(simcache.synth(2, 6, num_layers=2, num_experts=8, seed=0), tmp_path / "t.parquet")
    with pytest.raises(SimcacheError, match="trace must be a Trace .* got PosixPath \\(read it first\\)"):
        Workload(tmp_path / "t.parquet")
    with pytest.raises(SimcacheError, match="seed must be a non-negative integer, got 1.5"):
        simcache.synth(2, 6, seed=1.5)
    with pytest.raises(SimcacheError, match="expert_bytes must be a positive integer"):
        simcache.synth(2, 6, expert_bytes=0)
    with pytest.raises(SimcacheError, match="null samples must be a non-negative integer, got 2.5"):
        analyze(np.ones((1, 4, 4)), null_samples=2.5)
    with pytest.raises(SimcacheError, match="expert ids must be whole numbers|experts must hold integers"):
        simcache.Trace.from_arrays(np.array([[2.9, 3.9]]), request=[0], position=[0], layer=[0], num_experts=8)
    with pytest.raises(SimcacheError, match="'expert_bytes'=-5 is outside"):
        simcache.Trace.from_arrays(np.array([[2, 3]]), request=[0], position=[0], layer=[0], num_experts=8,
                                   expert_bytes=-5)


# ---- outputs: stale temporaries, races ----------------------------------------------------------


def test_stale_temporaries_of_the_same_target_are_cleaned(files):
    dead = files / ".r.json.999999999.abcdefgh.tmp"  # a PID no process has
    old = files / ".r.json.k3j_x9q2.tmp"  # written before temporaries named their process
    live = files / f".r.json.{os.getppid()}.abcdefgh.tmp"  # a running process: kept
    other = files / ".r.json.x.999999999.abcdefgh.tmp"  # another target's
    for p in (dead, old, live, other):
        p.write_text("partial")
    assert invoke("simulate", "t.parquet", "--out", "r.json").exit_code == 0
    assert not dead.exists() and not old.exists() and live.exists() and other.exists()
    live.unlink()
    other.unlink()


def test_temporary_cut_off_by_an_interrupt_is_removed(tmp_path, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def interrupted_mkstemp(**kwargs):  # the signal lands just after the file is created
        real(**kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "mkstemp", interrupted_mkstemp)
    with pytest.raises(KeyboardInterrupt):
        reserve(tmp_path / "r.json", suffixes=(".json",))
    assert len(temporaries(tmp_path)) == 1
    release()
    assert temporaries(tmp_path) == []


def test_target_created_meanwhile_is_kept_without_force(tmp_path):
    target = tmp_path / "r.json"
    reserve(target, overwrite=False, suffixes=(".json",))
    target.write_text("the other run's")  # another process finished first
    with pytest.raises(SimcacheError, match="appeared while this ran"):
        with atomic_output(target) as tmp:
            tmp.write_text("ours")
    assert target.read_text() == "the other run's" and temporaries(tmp_path) == []


def test_concurrent_writers_without_force_one_wins(tmp_path):
    cmd = [sys.executable, "-m", "simcache", "synth", "s.parquet", "--requests", "8", "--length", "400",
           "--layers", "8"]
    procs = [subprocess.Popen(cmd + ["--seed", str(i)], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert "exists" in loser or "appeared while this ran" in loser
    assert simcache.read_trace(tmp_path / "s.parquet").num_requests == 8
    assert temporaries(tmp_path) == []


# ---- interruption: no output, and no temporary after the next run -------------------------------


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A trace that takes seconds to simulate with a decision log (time to interrupt it)."""
    folder = tmp_path_factory.mktemp("big")
    t = simcache.synth(64, 1000, num_layers=16, num_experts=16, top_k=2, weights=False, seed=0)
    return simcache.write_trace(t, folder / "big.parquet")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from . import tiny_models

    folder = tmp_path_factory.mktemp("mixtral")
    tiny_models.build("mixtral", folder)
    text = tmp_path_factory.mktemp("text") / "prose.txt"
    text.write_text("the river and the wind of the moon is that poem " * 100)
    return folder, text


MID_RUN = 0.3  # seconds after the temporary appears: inside the simulation / generation


def _interrupt(cmd, cwd, target, sig, when):
    """Start ``cmd``, send ``sig`` at ``when`` -- "early" (as soon as its temporary beside
    ``target`` appears: imports and reading still under way), "mid" (:data:`MID_RUN` later)
    or "writing" (once the temporary has its first bytes) -- and return the exit status and
    stderr."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    prefix = f".{target.name}.{proc.pid}."

    def temporary():
        return next((p for p in target.parent.iterdir() if p.name.startswith(prefix)), None)

    def started():
        tmp = temporary()
        try:
            return tmp is not None and (when != "writing" or tmp.stat().st_size > 0)
        except FileNotFoundError:
            return False

    while not started():
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    if when == "mid":
        time.sleep(MID_RUN)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _commands(kind, big, tiny_model):
    if kind == "simulate --out":
        return ["simulate", str(big), "--policy", "lru,belady-bypass", "--capacity", "2,4,8",
                "--out", "r.parquet"], "r.parquet"
    if kind == "simulate --decisions":
        return ["simulate", str(big), "--policy", "belady-bypass", "--capacity", "4",
                "--decisions", "d.parquet"], "d.parquet"
    if kind == "synth":
        return ["synth", "s.parquet", "--requests", "64", "--length", "1000", "--layers", "16",
                "--experts", "16"], "s.parquet"
    folder, text = tiny_model
    return ["capture", "--model", str(folder), "--text", f"prose={text}", "--max-length", "64",
            "--out", "c.parquet"], "c.parquet"


# (kind, signal, when): each handled signal early, mid-run and while the output is being
# written (simulate --out writes a few kB in a millisecond: no "writing" point); SIGKILL once
POINTS = [(kind, sig, when) for kind in ["simulate --out", "simulate --decisions", "synth", "capture"]
          for sig in [signal.SIGINT, signal.SIGTERM]
          for when in ["early", "mid", "writing"] if not (kind == "simulate --out" and when == "writing")]
POINTS += [(kind, signal.SIGKILL, "mid") for kind in ["simulate --out", "simulate --decisions", "synth", "capture"]]


@pytest.mark.parametrize("kind, sig, when", POINTS, ids=[f"{k}-{s.name}-{w}" for k, s, w in POINTS])
def test_interrupted_runs_leave_nothing(kind, sig, when, big, request, tmp_path):
    model = request.getfixturevalue("tiny_model") if kind == "capture" else None
    args, name = _commands(kind, big, model)
    target = tmp_path / name
    rc, err = _interrupt([sys.executable, "-m", "simcache", *args], tmp_path, target, sig, when)
    state = (rc, temporaries(tmp_path), err)
    assert not target.exists(), state
    if sig != signal.SIGKILL:  # handled: click's 'Aborted!', exit status 1, the temporary gone
        assert rc == 1 and temporaries(tmp_path) == [], state
        assert err.strip() == "Aborted!", state  # nothing else: no traceback, no warning
    else:
        assert rc == -signal.SIGKILL and len(temporaries(tmp_path)) == 1, state  # nothing runs on SIGKILL...
    done = subprocess.run([sys.executable, "-m", "simcache", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert target.exists() and temporaries(tmp_path) == []  # ...and the next run cleans up


@pytest.fixture
def handler(monkeypatch):
    """The command line's SIGINT handler and unraisable hook, installed for one test; its state
    (interrupt seen, outputs refused) reset after it."""
    from simcache import _files, cli

    old = signal.signal(signal.SIGINT, cli._interrupt)
    monkeypatch.setattr(sys, "unraisablehook", cli._unraisable)
    yield cli
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGINT, old)
    cli._interrupt.raised = False
    _files._INTERRUPTED[0] = False


def test_a_signal_inside_an_import_is_raised_after_it(handler, tmp_path, monkeypatch):
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.3)\nCOMPLETE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_module", raising=False)
    with pytest.raises(KeyboardInterrupt):
        import slow_module  # noqa: F401  the signal arrives here...
        time.sleep(5)  # ...and is raised here, once the module is whole
    assert sys.modules["slow_module"].COMPLETE


def test_a_signal_inside_a_finalizer_is_raised_again(handler):
    class Dropped:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)  # the handler raises here, where Python can only print and drop it

    with pytest.raises(KeyboardInterrupt):
        Dropped()  # finalized at once
        time.sleep(5)  # raised again here


def test_no_output_is_committed_once_interrupted(handler, tmp_path):
    from simcache._files import note_interrupt

    note_interrupt()  # as if a library had caught the KeyboardInterrupt and gone on
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "r.json") as tmp:
            tmp.write_text("{}")
    with atomic_output(tmp_path / "sweep.parquet", checkpoint=True) as tmp:  # progress is kept
        tmp.write_text("cells")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.parquet"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_interrupted_sweep_keeps_what_finished(sig, big, tmp_path):
    """A sweep is the one command whose output survives an interrupt: the cells that finished,
    for the next run to resume from; still no temporary and no traceback."""
    cmd = [sys.executable, "-m", "simcache", "sweep", str(big), "--policy", "lru,fifo", "--capacity", "2,4",
           "--batch", "1,2,4,8", "--workers", "0", "--out", "sw.parquet"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / ".sw.parquet.parts"
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and any(parts.glob("*.parquet"))):
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.strip() == "Aborted!", (proc.returncode, err)
    kept = pq.read_table(tmp_path / "sw.parquet").num_rows
    assert 0 < kept < 16 and not parts.exists() and temporaries(tmp_path) == []
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "16 cells" in done.stdout, done.stderr
    assert pq.read_table(tmp_path / "sw.parquet").num_rows == 16 and temporaries(tmp_path) == []


# ---- the trace reader under fuzzing: a valid trace or a SimcacheError, nothing else -------------

INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()]
ODD_TYPES = [pa.float32(), pa.float64(), pa.string(), pa.bool_()]
META_VALUES = st.one_of(st.integers(-3, 40), st.integers(-2**70, 2**70), st.text(max_size=3), st.none(),
                        st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                        st.lists(st.integers(0, 3), max_size=2))
ROW_VALUES = st.one_of(st.integers(-3, 20), st.sampled_from([-1, 127, 128, 255, 256, 257, 32767, 32768, 65536,
                                                             2**31 - 1, 2**31, 2**32 + 1, 2**63 - 1]))


_GOOD: list = []


def _good():
    """A valid trace with every column, as an Arrow table and its metadata (built once)."""
    if not _GOOD:
        import tempfile

        t = simcache.synth(2, 3, num_layers=2, num_experts=4, top_k=2, seed=0)
        t = simcache.Trace.from_arrays(t.experts, request=t.request, position=t.position, layer=t.layer,
                                       phase=t.phase, weights=t.weights, token_id=np.arange(t.num_rows) % 7,
                                       domain=["a", "b", None] * (t.num_rows // 3), num_experts=4)
        with tempfile.TemporaryDirectory() as d:
            table = pq.read_table(simcache.write_trace(t, Path(d) / "good.parquet"))
        _GOOD.append(table)
    table = _GOOD[0]
    return table, json.loads(table.schema.metadata[b"simcache"])


def _cast(draw, array):
    target = draw(st.sampled_from(INT_TYPES + ODD_TYPES))
    try:
        return array.cast(target, safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return array


def _mutate_column(draw, col, what, rows):
    """``col`` with one mutation: another type, an out-of-range value, a null, a list shape."""
    if pa.types.is_fixed_size_list(col.type):
        k = col.type.list_size
        values = col.flatten()
        if what == "list":
            if draw(st.booleans()) or k == 1:
                return pa.array([list(x) for x in np.split(values.to_numpy(zero_copy_only=False), rows)])
            return pa.FixedSizeListArray.from_arrays(values.slice(0, rows * (k - 1)), k - 1)
        return pa.FixedSizeListArray.from_arrays(_mutate_column(draw, values, what, rows * k), k)
    if pa.types.is_dictionary(col.type):
        if what == "value":
            return pa.array(draw(st.lists(ROW_VALUES, min_size=rows, max_size=rows)), pa.int64())
        return col.dictionary_decode()
    if what == "type":
        return _cast(draw, col)
    if what == "value":
        v = col.cast(pa.int64()).to_numpy().copy()
        v[draw(st.integers(0, rows - 1))] = draw(ROW_VALUES)
        return pa.array(v, pa.uint64() if v.max() >= 2**63 else pa.int64())
    if what == "null":
        v = col.to_pylist()
        v[draw(st.integers(0, rows - 1))] = None
        return pa.array(v, col.type)
    return pa.array([[x] for x in col.to_pylist()])


@st.composite
def mutated(draw):
    table, meta = _good()
    rows = table.num_rows
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([c.name for c in COLUMNS]))
        what = draw(st.sampled_from(["type", "value", "null", "drop", "list"]))
        i = table.schema.get_field_index(name)
        if i < 0:
            continue
        if what == "drop":
            table = table.remove_column(i)
            continue
        try:
            new = _mutate_column(draw, table.column(i).combine_chunks(), what, rows)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            continue  # that mutation does not apply to the column as it now is
        table = table.set_column(i, name, new)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from([f.name for f in FIELDS] + ["schema_version", "model"]))
        if draw(st.booleans()):
            meta[key] = draw(META_VALUES)
        else:
            meta.pop(key, None)
    raw = draw(st.sampled_from(["dict", "dict", "dict", "list", "number", "garbage"]))
    meta = {"dict": meta, "list": [meta], "number": 3}.get(raw, b"\xff{not json")
    return table, meta


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=mutated())
def test_reader_fuzz_yields_a_valid_trace_or_a_simcache_error(case, tmp_path):
    table, meta = case
    path = write_table(tmp_path / "fuzz.parquet", table, meta)
    try:
        t = simcache.read_trace(path)
    except SimcacheError as exc:
        assert "\n" not in str(exc)
        event("refused")
        return
    event("read")
    assert t.validated() is t
    for col in COLUMNS:
        values = getattr(t, col.name)
        assert col.required <= (values is not None)
        assert values is None or values.dtype == np.dtype(col.dtype)


def test_capture_without_a_tokenizer_is_one_line(tiny_model, tmp_path, monkeypatch):
    import shutil

    folder, text = tiny_model
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    for p in bare.iterdir():
        if "token" in p.name or p.name.endswith(".model"):
            p.unlink()
    monkeypatch.chdir(tmp_path)
    result = invoke("capture", "--model", bare, "--text", text, "--out", "c.parquet")
    assert "has no usable tokenizer" in error_of(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]
