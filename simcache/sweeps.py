"""Sweeps: every cell of a grid of traces x workloads x policies x capacities x knobs (docs/design.md §13).

A *cell* is one :func:`simcache.simulate` call. The grid's parameters are declared once, in
:data:`KNOBS` (one :class:`Knob` per keyword argument of ``simulate``, plus the workload's);
the CLI's options, the TOML keys, the Parquet columns and the cell ids all come from it, so
a new knob of ``simulate`` is one line here.

Cells that share a trace and a workload (batch, prefill, split) form a *group*: one task,
which builds the :class:`~simcache.workload.Workload` once and runs all its cells, LRU ones
through the one-pass curve of :mod:`simcache.mrc`. Tasks run in this process
(``workers=0``) or on Dask distributed: an in-process ``LocalCluster`` by default, or an
existing scheduler. Each finished group is written at once as its own Parquet part beside the
output; the output itself is rewritten atomically from the parts (sorted in grid order, one
row group per group) when the sweep ends or is interrupted, so a re-run skips every cell
already present and an interrupted sweep loses only the groups still running.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from simcache._files import atomic_output, check_input, check_output
from simcache.errors import SimcacheError
from simcache.hybrid import miss_code
from simcache.policies import PRESETS, resolve
from simcache.simulator import SCOPES, SimResult, simulate
from simcache.timing import Calibration
from simcache.trace import Trace, read_trace
from simcache.transitions import demand_counts
from simcache.workload import PREFILL_MODES, Workload


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _threshold(text):
    """A number, or the text ``<x>/E`` kept as given (simulate resolves it per trace)."""
    if isinstance(text, str) and text.strip().upper().endswith("/E"):
        return text.strip()
    return float(text)


@dataclass(frozen=True)
class Knob:
    """One parameter of the grid.

    ``parse`` turns one CLI / TOML value into the Python value; ``workload`` marks the
    parameters the :class:`Workload` (and so the task) depends on; ``lru_free`` marks those
    that leave LRU's result unchanged (the one-pass curve ignores them) or that the curve
    handles itself. Every other knob is passed to :func:`simcache.simulate` by name.
    """

    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    workload: bool = False
    lru_free: bool = False


KNOBS: tuple[Knob, ...] = (
    Knob("batch", 1, int, "sequences decoding together", workload=True),
    Knob("prefill", "skip", str, f"prompt tokens: {' or '.join(PREFILL_MODES)}", workload=True),
    Knob("split", None, float, "score on this fraction of requests; fit the Markov prior on the rest",
         workload=True),
    Knob("split_seed", 0, int, "seed of the train/test split", workload=True),
    Knob("policy", "lru", str, f"preset: {', '.join(PRESETS)}"),
    Knob("capacity", None, int, "slots per layer (or in the global pool)", lru_free=True),
    Knob("scope", "layer", str, f"cache scope: {' or '.join(SCOPES)}", lru_free=True),
    Knob("threshold", 0.1, _threshold, "Markov admission tau, or X/E", lru_free=True),
    Knob("evict", None, str, "override the preset's eviction rule"),
    Knob("admit", None, str, "override the preset's admission rule"),
    Knob("horizon", 4, int, "steps ahead for markov-h", lru_free=True),
    Knob("decay_every", 100, int, "steps between decays of the Markov counts", lru_free=True),
    Knob("decay", 0.99, float, "decay factor of the Markov counts", lru_free=True),
    Knob("seed", 0, int, "seed of random eviction", lru_free=True),
    Knob("expert_bytes", None, int, "override the trace's bytes per expert", lru_free=True),
    Knob("overlap", None, _bool, "copies overlap compute (default: the calibration's)", lru_free=True),
    Knob("miss", "load", str, "who serves a miss: load (copy), cpu (the host CPU), auto, auto-cputime"),
    Knob("prefetch", "none", str, "prefetch predictor: none, oracle, lookahead, markov (docs/prefetch.md)"),
    Knob("prefetch_width", None, int, "experts prefetched per predicted group (default: top-k)"),
)
KNOB = {k.name: k for k in KNOBS}
WORKLOAD_KNOBS = tuple(k.name for k in KNOBS if k.workload)
CELL_KNOBS = tuple(k.name for k in KNOBS if not k.workload)
# sweep settings a TOML file may hold beside the knobs
SETTINGS = ("traces", "out", "workers", "scheduler", "calibration")


# ---- the trace's identity -------------------------------------------------------------------


def trace_hash(trace: Trace) -> str:
    """sha256 (hex, 16 digits) of what a simulation reads from a trace: its routing columns
    and the metadata that shapes keys and times."""
    h = hashlib.sha256()
    for a in (trace.request, trace.position, trace.phase, trace.layer, trace.experts):
        h.update(np.ascontiguousarray(a).tobytes())
    meta = {k: trace.metadata.get(k) for k in ("num_layers", "num_experts", "top_k", "expert_bytes")}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cell_id(hash_: str, params: dict) -> str:
    """Id of one cell: its trace's hash and every parameter that differs from its default (so
    adding a knob keeps the ids, and the resumability, of earlier results)."""
    given = {k: params[k] for k in KNOB if params.get(k, KNOB[k].default) != KNOB[k].default}
    text = json.dumps({"trace": hash_, **given}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- the grid ---------------------------------------------------------------------------------


@dataclass
class Group:
    """One task: a trace, a workload, and the cells that share it."""

    index: int
    source: Any  # a path (read on the worker) or a Trace
    name: str
    hash: str
    workload: dict
    cells: list[dict] = field(default_factory=list)  # each: knob values + "cell" + "index"


def _values(name: str, value) -> list:
    knob = KNOB[name]
    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, str) and "," in value:
        items = [v for v in value.split(",") if v.strip()]
    out = []
    for v in items:
        if v is None:
            out.append(None)
            continue
        try:
            out.append(knob.parse(v.strip() if isinstance(v, str) else v))
        except (TypeError, ValueError):
            raise SimcacheError(f"{name}: cannot read {v!r} ({knob.help})") from None
    return out


def build_grid(traces: Sequence, grid: dict) -> list[Group]:
    """The groups of a grid: ``traces`` (paths or Trace objects) and knob -> value or list.

    Every cell is checked before any runs (policy names, scope, capacity against each trace's
    shape); a grid without cells is an error.
    """
    unknown = sorted(set(grid) - set(KNOB))
    if unknown:
        raise SimcacheError(f"unknown sweep parameter '{unknown[0]}' (known: {', '.join(KNOB)})")
    if not traces:
        raise SimcacheError("the grid has no cells: no traces given")
    values = {k.name: _values(k.name, grid[k.name]) if k.name in grid else [k.default] for k in KNOBS}
    empty = [k for k, v in values.items() if not v]
    if empty:
        raise SimcacheError(f"the grid has no cells: '{empty[0]}' has an empty list of values")
    if values["capacity"] == [None]:
        raise SimcacheError("the grid has no cells: give at least one capacity")
    for p in set(values["policy"]):
        for e in set(values["evict"]):
            for a in set(values["admit"]):
                resolve(p, e, a)
    for s in values["scope"]:
        if s not in SCOPES:
            raise SimcacheError(f"scope must be 'layer' or 'global', got {s!r}")
    for p in values["prefill"]:
        if p not in PREFILL_MODES:
            raise SimcacheError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {p!r}")
    groups = []
    cell_index = 0
    for source in traces:
        trace = source if isinstance(source, Trace) else read_trace(source)
        name = trace.model if isinstance(source, Trace) else str(source)
        h = trace_hash(trace)
        L, E = trace.num_layers, trace.num_experts
        for wl in itertools.product(*(values[k] for k in WORKLOAD_KNOBS)):
            g = Group(len(groups), source, name, h, dict(zip(WORKLOAD_KNOBS, wl)))
            for combo in itertools.product(*(values[k] for k in CELL_KNOBS)):
                params = {**g.workload, **dict(zip(CELL_KNOBS, combo))}
                top = E if params["scope"] == "layer" else L * E
                c = params["capacity"]
                if c is None or c <= 0 or c > top:
                    raise SimcacheError(
                        f"capacity {c} is outside 1..{top} for {name} (scope {params['scope']}, "
                        f"{L} layers x {E} experts)")
                g.cells.append({**params, "cell": cell_id(h, params), "index": cell_index})
                cell_index += 1
            groups.append(g)
    return groups


# ---- one group: the serial path, shared with `simcache simulate` -----------------------------


def _lru_curve_cell(params: dict) -> bool:
    """Whether the one-pass LRU curve gives this cell's result."""
    e, a = resolve(params["policy"], params["evict"], params["admit"])
    if (e.name, a.name) != ("lru", "all"):
        return False
    return all(params.get(k.name, k.default) == k.default for k in KNOBS
               if not (k.workload or k.lru_free or k.name in ("policy", "evict", "admit")))


def _check_ignored(params: dict, num_experts: int):
    """The checks simulate makes of the knobs LRU ignores, so that a cell the curve serves
    fails where its simulate call would."""
    from simcache.simulator import parse_threshold

    parse_threshold(params.get("threshold", 0.1), num_experts)
    if params.get("horizon", 4) < 1:
        raise SimcacheError(f"horizon must be >= 1, got {params['horizon']}")
    if params.get("decay_every", 100) < 0 or not (0.0 < params.get("decay", 0.99) <= 1.0):
        raise SimcacheError("decay must be in (0, 1] and decay_every >= 0")


def run_cells(work: Workload, cells: Sequence[dict], *, prior=None, calibration: Calibration | None = None,
              record: bool = False, progress: Callable[[int], None] | None = None,
              train_demand=None) -> list[SimResult]:
    """Run every cell (a dict of cell knobs) on one workload; LRU cells at capacities the
    one-pass curve covers come from it (equal results, one pass per scope and timing).

    This is the one grid implementation: ``simcache simulate`` and each sweep task call it.
    """
    from simcache.mrc import _smallest, lru_results, stack_distances

    results: dict[int, SimResult] = {}
    by_timing: dict[tuple, list[int]] = {}
    if not record:
        for j, params in enumerate(cells):
            if _lru_curve_cell(params):
                _check_ignored(params, work.trace.num_experts)
                key = (params["scope"], params["expert_bytes"], params["overlap"])
                by_timing.setdefault(key, []).append(j)
    stacks = {}
    for (scope, eb, ov), js in by_timing.items():
        caps = [cells[j]["capacity"] for j in js]
        if scope not in stacks and max(caps) >= _smallest(work):
            stacks[scope] = stack_distances(work, scope)
        for j, r in zip(js, lru_results(work, caps, scope=scope, calibration=calibration, overlap=ov,
                                        expert_bytes=eb, stack=stacks.get(scope))):
            results[j] = r
            if progress is not None:
                progress(work.demand.num_accesses)
    for j, params in enumerate(cells):
        if j in results:
            continue
        kwargs = {k: params.get(k, KNOB[k].default) for k in CELL_KNOBS}
        results[j] = simulate(work, **kwargs, prior=prior, calibration=calibration, record=record,
                              progress=progress, train_demand=train_demand)
    return [results[j] for j in range(len(cells))]


def _load(source) -> Trace:
    if isinstance(source, Trace):
        return source
    return _read_cached(str(source), os.path.getmtime(source))


_CACHE: dict[tuple, Trace] = {}


def _read_cached(path: str, mtime: float) -> Trace:
    """Traces read on this worker, the last two kept (a worker often runs several groups of
    one trace)."""
    key = (path, mtime)
    if key not in _CACHE:
        while len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = read_trace(path)
    return _CACHE[key]


def prepare(trace: Trace, batch: int = 1, prefill: str = "skip", split: float | None = None,
            split_seed: int = 0):
    """(Workload, Markov prior or None, train trace or None) for one group's settings."""
    prior = train = None
    if split is not None:
        from simcache.transitions import split_requests, transition_counts

        train, trace = split_requests(trace, split, split_seed)
        prior = transition_counts(train)
    return Workload(trace, batch, prefill), prior, train


def run_group(group: Group, calibration: Calibration | None = None) -> list[dict]:
    """One task: build the group's workload once, run its cells, return their rows."""
    trace = _load(group.source)
    if trace_hash(trace) != group.hash:
        raise SimcacheError(f"{group.name} changed while the sweep ran (content hash differs)")
    work, prior, train = prepare(trace, **group.workload)
    results = run_cells(work, group.cells, prior=prior, calibration=calibration,
                        train_demand=None if train is None else demand_counts(train))
    smallest = int(np.diff(work.demand.group_ptr).max())
    return [_row(group, params, r, "stack" if _lru_curve_cell(params) and r.capacity >= smallest else "direct")
            for params, r in zip(group.cells, results)]


def _row(group: Group, params: dict, r: SimResult, method: str) -> dict:
    row = {"trace": group.name, "trace_hash": group.hash, "cell": params["cell"], "method": method}
    row.update(r.to_dict())
    for k in KNOBS:  # the settings to_dict does not already hold (it holds the resolved ones)
        if k.name not in row:
            row[k.name] = params[k.name]
    pools = r.num_layers if r.scope == "layer" else 1
    row["memory_bytes"] = None if r.expert_bytes is None else r.capacity * r.expert_bytes * pools
    return row


# ---- the sweep --------------------------------------------------------------------------------


def sweep(
    traces: Sequence,
    *,
    out=None,
    workers: int | None = None,
    scheduler: str | None = None,
    calibration: Calibration | None = None,
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
    **grid,
) -> "pandas.DataFrame":  # noqa: F821
    """Run a grid of cells and return one row per cell (a pandas DataFrame).

    Parameters
    ----------
    traces : paths or Trace objects
    out : path, optional
        Parquet file of results. Cells already in it are skipped (resumable); it is rewritten
        atomically with every row, old and new, in grid order.
    workers : int, optional
        Dask workers of the in-process ``LocalCluster`` (default: one per core); 0 runs the
        groups in this process, one after another.
    scheduler : str, optional
        ``tcp://HOST:PORT`` of an existing Dask scheduler (then ``workers`` is ignored).
    calibration : Calibration, optional
    progress : callable, optional
        Called with the number of cells finished, as groups finish.
    total : callable, optional
        Called once with the number of cells still to run (to size a progress bar).
    **grid
        Knob name (see :data:`KNOBS`) -> one value or a list of values.

    Returns
    -------
    pandas.DataFrame
        One row per cell of the grid: trace, trace_hash, cell id, method (``stack`` for the
        one-pass LRU curve, ``direct``), every counter and time of :meth:`SimResult.to_dict`,
        every knob, and ``memory_bytes`` (GPU memory of the resident experts).

    Examples
    --------
    >>> import simcache
    >>> t = simcache.synth(4, 32, num_layers=2, num_experts=8, top_k=2, seed=3)
    >>> df = simcache.sweep([t], policy=["lru", "belady-bypass"], capacity=[2, 4], workers=0)
    >>> df[["policy", "capacity", "hits"]].values.tolist() == [
    ...     [p, c, simcache.simulate(t, p, c).hits] for p in ["lru", "belady-bypass"] for c in [2, 4]]
    True
    """
    import pandas as pd

    groups = build_grid(traces, grid)
    wanted = [c["cell"] for g in groups for c in g.cells]
    parts = None
    done: set[str] = set()
    old = None
    if out is not None:
        out = check_output(out)
        if out.suffix.lower() != ".parquet":
            raise SimcacheError(f"the sweep writes Parquet: --out must end in .parquet, got {out.name}")
        parts = out.with_name(f".{out.name}.parts")
        old = _read_results(out, parts)
        if old is not None:
            done = set(old["cell"])
    todo = []
    for g in groups:
        cells = [c for c in g.cells if c["cell"] not in done]
        if cells:
            todo.append(Group(g.index, g.source, g.name, g.hash, g.workload, cells))
    if total is not None:
        total(sum(len(g.cells) for g in todo))
    rows: list[dict] = []

    def finished(g: Group, new: list[dict]):
        if parts is not None:
            _write_part(parts, g, new)
        rows.extend(new)
        if progress is not None:
            progress(len(new))

    try:
        if todo and (workers == 0 and scheduler is None):
            for g in todo:
                finished(g, run_group(g, calibration))
        elif todo:
            _run_dask(todo, workers, scheduler, calibration, finished)
    finally:
        if out is not None and (rows or old is not None):
            frame = _merge(old, rows, wanted)
            _write_results(frame, out)
            shutil.rmtree(parts, ignore_errors=True)
    frame = _merge(old, rows, wanted)
    present = frame[frame["cell"].isin(set(wanted))]
    return present.reset_index(drop=True) if len(present) else pd.DataFrame(columns=frame.columns)


def _run_dask(todo: list[Group], workers, scheduler, calibration, finished):
    import logging

    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise SimcacheError("sweeps on Dask need the distributed package: pip install distributed") from None
    cluster = None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="4s")
        except (OSError, TimeoutError) as exc:
            raise SimcacheError(f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__})") from None
    else:
        n = workers if workers is not None else (os.cpu_count() or 1)
        if n < 1:
            raise SimcacheError(f"workers must be >= 0, got {n}")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        futures = {client.submit(run_group, g, calibration, pure=False, key=f"simcache-group-{g.index}-{g.hash}"): g
                   for g in todo}
        for fut in as_completed(futures):
            finished(futures[fut], fut.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---- results on disk --------------------------------------------------------------------------


def _write_part(parts: Path, g: Group, rows: list[dict]):
    import pandas as pd

    parts.mkdir(exist_ok=True)
    with atomic_output(parts / f"group-{g.index:06d}-{g.hash}.parquet", checkpoint=True) as tmp:
        pd.DataFrame.from_records(rows).to_parquet(tmp, index=False)


def _read_results(out: Path, parts: Path):
    """Rows already computed: the output, plus parts left by a sweep that was killed."""
    import pandas as pd

    frames = []
    if out.exists():
        frames.append(read_results(out))
    if parts.is_dir():
        for p in sorted(parts.glob("*.parquet")):
            frames.append(pd.read_parquet(p))
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True).drop_duplicates("cell", keep="first")


def read_results(path) -> "pandas.DataFrame":  # noqa: F821
    """A sweep's results file, checked to be one."""
    import pandas as pd

    path = check_input(path, "results file")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise SimcacheError(f"{path} is not a readable Parquet file ({type(exc).__name__})") from None
    missing = [c for c in ("cell", "trace_hash", "policy", "capacity", "hit_ratio") if c not in frame.columns]
    if missing:
        raise SimcacheError(f"{path} is not a sweep's results (no '{missing[0]}' column)")
    return frame


def _merge(old, rows: list[dict], wanted: list[str]):
    """Old and new rows, one per cell, in grid order (cells of other grids after, by id)."""
    import pandas as pd

    frames = ([old] if old is not None else []) + ([pd.DataFrame.from_records(rows)] if rows else [])
    if not frames:
        return pd.DataFrame(columns=["cell"])
    frame = pd.concat(frames, ignore_index=True).drop_duplicates("cell", keep="first")
    order = {c: i for i, c in enumerate(wanted)}
    rank = frame["cell"].map(order)
    frame = frame.assign(_rank=rank.fillna(len(order)), _id=frame["cell"])
    frame = frame.sort_values(["_rank", "_id"], kind="stable").drop(columns=["_rank", "_id"])
    return frame.reset_index(drop=True)


def _write_results(frame, out: Path):
    """Atomically, one row group per (trace, workload) group; also when interrupted (what
    finished is kept for the next run to resume from)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    keys = ["trace_hash"] + [k for k in WORKLOAD_KNOBS if k in frame.columns]
    with atomic_output(out, checkpoint=True) as tmp:
        with pq.ParquetWriter(tmp, table.schema) as writer:
            if len(frame) == 0:
                writer.write_table(table)
            start = 0
            bounds = list(zip(*(frame[k].map(repr) for k in keys)))
            for i in range(1, len(frame) + 1):
                if i == len(frame) or bounds[i] != bounds[start]:
                    writer.write_table(table.slice(start, i - start))
                    start = i


# ---- configuration ------------------------------------------------------------------------------


def load_config(path) -> dict:
    """A sweep's TOML file: knob names (see :data:`KNOBS`) and the settings traces, out,
    workers, scheduler, calibration. An unknown key is an error naming it.

    Example::

        traces = ["traces/flame-moe-290m.parquet"]
        policy = ["lru", "belady", "belady-bypass"]
        capacity = [4, 8, 16]
        batch = [1, 16]
        out = "results.parquet"
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise SimcacheError("TOML configs need Python >= 3.11 or the tomli package") from None

    path = check_input(path, "config file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SimcacheError(f"{path} is not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise SimcacheError(f"{path} is not valid TOML (not UTF-8 text)") from None
    unknown = sorted(set(data) - set(KNOB) - set(SETTINGS))
    if unknown:
        raise SimcacheError(f"unknown parameter '{unknown[0]}' in {path} (known: {', '.join(list(KNOB) + list(SETTINGS))})")
    return data


# ---- one workload, policies x capacities: `simcache simulate` ---------------------------------


@dataclass
class GridRun:
    """What :func:`simulate_grid` ran: the scored trace, its workload, one result per
    (policy, capacity), and notes on how it was scored (split, prior)."""

    trace: Trace
    work: Workload
    results: list[SimResult]
    notes: list[str]
    prior: np.ndarray | None = None  # the Markov prior's counts the cells ran with


def simulate_grid(
    trace,
    policies: Sequence[str] = ("lru",),
    capacities: Sequence[int] | None = None,
    *,
    batch: int = 1,
    prefill: str = "skip",
    split: float | None = None,
    seed: int = 0,
    prior=None,
    calibration: Calibration | None = None,
    record: bool = False,
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
    misses: Sequence[str] = ("load",),
    **knobs,
) -> GridRun:
    """Every (policy, capacity) on one workload of one trace, in this process.

    ``trace`` is a path or a Trace; ``capacities`` default to E/4 per layer (L*E/4 global);
    ``split`` scores a fraction of the requests with a Markov prior fitted on the rest
    (seeded by ``seed``, which also seeds random eviction); ``prior`` is a count array or a
    path (a separate trace or a .npy file). Other keyword arguments are cell knobs
    (:data:`KNOBS`). ``progress`` is called with accesses done, ``total`` once with the
    number to do. ``misses`` are the ``--miss`` modes to run each cell with; static
    placement's demand counts come from the split's train requests or a prior trace.
    """
    from simcache.transitions import load_prior

    path = None if isinstance(trace, Trace) else Path(trace)
    t = trace if path is None else read_trace(path)
    unknown = sorted(set(knobs) - set(CELL_KNOBS))
    if unknown:
        raise SimcacheError(f"unknown simulate parameter '{unknown[0]}'")
    prefetches = knobs.pop("prefetch", "none")  # a list, like policies and capacities
    prefetches = [prefetches] if isinstance(prefetches, str) else list(prefetches)
    scope = knobs.get("scope", "layer")
    L, E = t.num_layers, t.num_experts
    if capacities is None:
        capacities = [max(1, E // 4) if scope == "layer" else max(1, L * E // 4)]
    if not policies or not capacities:
        raise SimcacheError("the grid has no cells: give at least one policy and one capacity")
    if record and len(policies) * len(capacities) * len(misses) * len(prefetches) != 1:
        raise SimcacheError("--decisions needs exactly one policy, one capacity, one --miss and one prefetch")
    for m in misses:
        miss_code(m)
    for p in policies:
        resolve(p, knobs.get("evict"), knobs.get("admit"))
    notes = []
    prior_counts = train_demand = None
    if split is not None:
        if prior is not None:
            raise SimcacheError("use either --split or --prior, not both")
        work, prior_counts, train = prepare(t, batch, prefill, split, seed)
        if not np.asarray(prior_counts).any():
            raise SimcacheError(
                f"the prior would be empty: the {train.num_requests:,} training requests have no two "
                f"consecutive tokens")
        train_demand = demand_counts(train)
        notes.append(
            f"scored on {work.trace.num_requests:,} test requests; Markov prior and static hot set "
            f"fitted on {train.num_requests:,} train requests (split by request, seed {seed})")
    else:
        if isinstance(prior, (str, Path)):
            if path is not None and Path(prior).resolve() == path.resolve():
                raise SimcacheError("the prior is the trace being scored: fit it on a separate trace")
            notes.append(f"Markov prior (and static hot set) from {prior}")
            prior_counts = load_prior(prior, L, E)
            if Path(prior).suffix != ".npy":
                train_demand = demand_counts(read_trace(prior))
        elif prior is not None:
            prior_counts = np.asarray(prior)
        work = Workload(t, batch, prefill)
    base = {k: knobs.get(k, KNOB[k].default) for k in CELL_KNOBS}
    base["seed"] = knobs.get("seed", seed)
    cells = [{**base, "policy": p, "capacity": int(c), "miss": m, "prefetch": f}
             for f in prefetches for p in policies for m in misses for c in capacities]
    if total is not None:
        total(work.demand.num_accesses * len(cells))
    results = run_cells(work, cells, prior=prior_counts, calibration=calibration, record=record,
                        train_demand=train_demand, progress=progress)
    return GridRun(work.trace, work, results, notes, prior_counts)


# ---- the winning cell ---------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int:
    """``24GiB``, ``1.5 GB``, ``512MiB`` or a plain number of bytes.

    >>> parse_bytes("24GiB"), parse_bytes("1.5 GB"), parse_bytes(1024)
    (25769803776, 1500000000, 1024)
    """
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SimcacheError(f"a memory budget looks like 24GiB, 1.5GB or 512MiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def rank(frame):
    """Cells best first: lowest predicted time per token, then highest hit ratio, then the
    least memory (cell id last, so the order is total)."""
    t = frame["time_per_token_s"] if "time_per_token_s" in frame else None
    keys = frame.assign(_t=(t.astype(float) if t is not None else np.nan),
                        _h=-frame["hit_ratio"].astype(float),
                        _m=frame["memory_bytes"].astype(float) if "memory_bytes" in frame else np.nan)
    keys["_t"] = keys["_t"].fillna(np.inf)
    return frame.loc[keys.sort_values(["_t", "_h", "_m", "cell"], kind="stable").index]


def winner(results, budget=None, *, trace_hash: str | None = None, **where) -> dict:
    """The winning cell of a sweep's results (a DataFrame or a Parquet path): among the cells
    of ``trace_hash`` (if given) matching ``where`` (column == value) whose resident experts
    fit ``budget`` bytes (``memory_bytes``; an int or text like ``24GiB``), the best by
    :func:`rank`. Returns the row as a dict."""
    frame = read_results(results) if isinstance(results, (str, Path)) else results
    if trace_hash is not None:
        frame = frame[frame["trace_hash"] == trace_hash]
        if frame.empty:
            raise SimcacheError(f"the results hold no cell for this trace (content hash {trace_hash}): "
                                "they come from another trace")
    for k, v in where.items():
        if k not in frame.columns:
            raise SimcacheError(f"the results have no column '{k}'")
        frame = frame[frame[k] == v]
        if frame.empty:
            raise SimcacheError(f"no cell of the results has {k} = {v}")
    if budget is not None:
        b = parse_bytes(budget) if isinstance(budget, str) else int(budget)
        mem = frame["memory_bytes"].astype(float)
        fits = frame[mem <= b]
        if fits.empty:
            least = mem.min()
            more = "no cell records its memory (no expert_bytes)" if least != least else \
                f"the smallest cell needs {least / 2**30:.2f} GiB"
            raise SimcacheError(f"no cell fits a budget of {b / 2**30:.2f} GiB ({more})")
        frame = fits
    row = rank(frame).iloc[0].to_dict()
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}


# settings the simulator's result records in resolved form, and timing-only ones (replay
# measures time itself)
_RESOLVED = ("policy", "capacity", "scope", "batch", "evict", "admit", "threshold")
_TIMING = ("expert_bytes", "overlap")


def winning_settings(results, trace: Trace, budget=None, *, accepts: Iterable[str] = _RESOLVED,
                     **where) -> tuple[dict, dict]:
    """The winning cell of ``results`` for ``trace`` within ``budget`` (see :func:`winner`)
    and the keyword arguments that reproduce it, restricted to the names a consumer
    ``accepts`` (e.g. the replay harness's ``run``). A setting of the cell away from its
    default that the consumer cannot take is an error naming it, rather than a replay of
    something else."""
    row = winner(results, budget, trace_hash=trace_hash(trace), **where)
    accepts = set(accepts)
    kwargs = {"policy": row["policy"], "capacity": int(row["capacity"]), "scope": row["scope"],
              "batch": int(row["batch"]), "evict": row["evict"], "admit": row["admit"]}
    if row.get("threshold") is not None:
        kwargs["threshold"] = float(row["threshold"])
    for k in KNOBS:
        if k.name in _RESOLVED or k.name in _TIMING or k.name not in row:
            continue
        value = row[k.name]
        if value is not None and k.default is not None and isinstance(k.default, (int, float)):
            value = type(k.default)(value)
        if value != k.default:
            kwargs[k.name] = value
    missing = sorted(set(kwargs) - accepts)
    if missing:
        k = missing[0]
        raise SimcacheError(f"the winning cell ({row['policy']}, capacity {row['capacity']}) has {k} = "
                            f"{kwargs[k]!r}, which this command cannot reproduce")
    return row, kwargs
