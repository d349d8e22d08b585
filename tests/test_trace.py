"""Trace format v1: round trips, sorting, validation and reader errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import simcache
from simcache import SimcacheError
from simcache.trace import TraceWriter


def small(**kw):
    experts = np.array([[0, 1], [2, 3], [1, 0], [3, 2], [2, 1], [0, 3]])
    args = dict(request=[0, 0, 0, 0, 1, 1], position=[0, 0, 1, 1, 0, 0], layer=[0, 1, 0, 1, 0, 1],
                num_experts=4)
    args.update(kw)
    return simcache.Trace.from_arrays(experts, **args)


def test_round_trip_keeps_every_column(tmp_path):
    t = small(
        weights=np.full((6, 2), 0.5), token_id=[5, 5, 6, 6, 7, 7], phase=[0, 0, 1, 1, 1, 1],
        domain=["code", "code", "code", "code", "poetry", "poetry"], model="tiny", expert_bytes=123,
    )
    path = simcache.write_trace(t, tmp_path / "t.parquet")
    u = simcache.read_trace(path)
    for name in ("request", "position", "phase", "layer", "experts", "weights", "token_id"):
        np.testing.assert_array_equal(getattr(u, name), getattr(t, name))
    assert [u.domains[c] for c in u.domain] == [t.domains[c] for c in t.domain]
    assert u.metadata["model"] == "tiny" and u.expert_bytes == 123
    assert (u.num_layers, u.num_experts, u.top_k, u.num_tokens, u.num_requests) == (2, 4, 2, 3, 2)
    meta = json.loads(pq.read_schema(path).metadata[b"simcache"])
    assert meta["schema_version"] == 1


def test_rows_are_sorted_on_construction():
    t = small(request=[1, 1, 0, 0, 0, 0], position=[0, 0, 1, 1, 0, 0])
    assert t.request.tolist() == [0, 0, 0, 0, 1, 1]
    assert t.position.tolist() == [0, 0, 1, 1, 0, 0]
    np.testing.assert_array_equal(t.token_experts()[0], [[2, 1], [0, 3]])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_experts=3), "expert id 3 is outside [0, 3)"),
        (dict(request=[0, 0, 0, 1, 1, 1], position=[0, 0, 1, 0, 0, 1], layer=[0, 1, 0, 0, 1, 1]),
         "exactly one row for each"),
        (dict(layer=[0, 0, 0, 1, 0, 1]), "appears twice at layer 0"),
        (dict(phase=[1, 1, 0, 0, 1, 1]), "prefill token after a decode token"),
        (dict(phase=[0, 1, 1, 1, 1, 1]), "phase differs between layers"),
        (dict(weights=np.ones((6, 3))), "weights shape"),
    ],
)
def test_invalid_traces_are_refused(kwargs, message):
    with pytest.raises(SimcacheError, match=message.replace("[", r"\[").replace(")", r"\)")):
        small(**kwargs)


def test_repeated_expert_in_a_row_is_refused():
    with pytest.raises(SimcacheError, match="repeats an expert"):
        simcache.Trace.from_arrays(np.array([[1, 1]]), request=[0], position=[0], layer=[0], num_experts=4)


def test_empty_trace_is_refused():
    with pytest.raises(SimcacheError, match="empty"):
        simcache.Trace.from_arrays(np.zeros((0, 2), int), request=[], position=[], layer=[], num_experts=4,
                                   num_layers=1)


def write_raw(path, table, meta):
    table = table.replace_schema_metadata({b"simcache": json.dumps(meta).encode()} if meta else None)
    pq.write_table(table, path)


def good_table():
    return pa.table({
        "request": pa.array([0, 0], pa.int32()), "position": pa.array([0, 1], pa.int32()),
        "phase": pa.array([1, 1], pa.int8()), "layer": pa.array([0, 0], pa.int16()),
        "experts": pa.FixedSizeListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int16()), 2),
    })


GOOD_META = {"schema_version": 1, "num_layers": 1, "num_experts": 4, "top_k": 2}


def test_reader_accepts_a_hand_written_file(tmp_path):
    write_raw(tmp_path / "ok.parquet", good_table(), GOOD_META)
    assert simcache.read_trace(tmp_path / "ok.parquet").num_tokens == 2


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t, m: (t, None), "no simcache metadata"),
        (lambda t, m: (t, {**m, "schema_version": 2}), "schema version 2 is not supported"),
        (lambda t, m: (t, {k: v for k, v in m.items() if k != "top_k"}), "lacks 'top_k'"),
        (lambda t, m: (t, {**m, "top_k": 3}), "2 entries per row but top_k=3"),
        (lambda t, m: (t, {**m, "num_experts": 3}), "expert id 3 is outside"),
        (lambda t, m: (t.drop(["layer"]), m), "missing column 'layer'"),
        (lambda t, m: (t.set_column(4, "experts", pa.array([[0, 1], [2, 3]])), m), "must be fixed_size_list"),
        (lambda t, m: (t.set_column(0, "request", pa.array([0.5, 1.0])), m), "must be an integer"),
        (lambda t, m: (t.slice(0, 0), m), "empty"),
    ],
)
def test_reader_names_the_problem(tmp_path, mutate, message):
    table, meta = mutate(good_table(), GOOD_META)
    write_raw(tmp_path / "bad.parquet", table, meta)
    with pytest.raises(SimcacheError, match=message.replace("(", r"\(").replace(")", r"\)")):
        simcache.read_trace(tmp_path / "bad.parquet")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_row_order_check_compares_every_adjacent_pair_across_chunks(chunk):
    """The chunked order check agrees with a whole-array reference for every single swap of
    adjacent rows, wherever the swap falls against the chunk edges."""
    from simcache.trace import _in_order

    n = 3 * chunk + 2
    r = np.repeat(np.arange(n // 2 + 1), 2)[:n]
    p = np.arange(n) % 2
    l = np.zeros(n, np.int16)

    def reference(r, p, l):
        key = list(zip(r.tolist(), p.tolist(), l.tolist()))
        return all(a <= b for a, b in zip(key, key[1:]))

    assert _in_order(r, p, l, chunk) and reference(r, p, l)
    for i in range(n - 1):
        order = np.arange(n)
        order[[i, i + 1]] = order[[i + 1, i]]
        args = (r[order], p[order], l[order])
        assert _in_order(*args, chunk) == reference(*args) is False, i


def test_reader_refuses_missing_and_non_parquet_files(tmp_path):
    with pytest.raises(SimcacheError, match="not found"):
        simcache.read_trace(tmp_path / "nope.parquet")
    (tmp_path / "x.parquet").write_text("hello")
    with pytest.raises(SimcacheError, match="not a Parquet file"):
        simcache.read_trace(tmp_path / "x.parquet")


def test_writer_leaves_nothing_behind_on_error(tmp_path):
    path = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError):
        with TraceWriter(path, num_layers=1, num_experts=4, top_k=1) as w:
            w.write(request=[0], position=[0], phase=[1], layer=[0], experts=[[1]])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_file_without_overwrite(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_text("keep me")
    with pytest.raises(SimcacheError, match="exists"):
        TraceWriter(path, overwrite=False, num_layers=1, num_experts=4, top_k=1)
    assert path.read_text() == "keep me"


def test_select_requests_and_summary():
    t = small()
    sub = t.select_requests([1])
    assert sub.num_tokens == 1 and sub.request.tolist() == [1, 1]
    s = t.summary()
    assert s["tokens"] == 3 and s["rows"] == 6 and s["load_max_over_mean_max"] >= 1.0


def test_one_declaration_drives_the_dataclass_the_file_and_the_checks(tmp_path):
    import dataclasses

    from simcache.trace import COLUMNS, Trace

    names = [c.name for c in COLUMNS]
    assert [f.name for f in dataclasses.fields(Trace)] == names + ["domains", "metadata"]
    t = small(weights=np.full((6, 2), 0.5), token_id=[5, 5, 6, 6, 7, 7], domain=["a"] * 6)
    schema = pq.read_schema(simcache.write_trace(t, tmp_path / "t.parquet"))
    present = [n for n in names if getattr(t, n) is not None]
    assert schema.names == present and set(names) - set(present) == {"step", "lookahead", "lookahead_scores"}
    for col in COLUMNS:
        if col.name not in present:
            continue
        assert schema.field(col.name).type == col.arrow_type({"top_k": t.top_k})
        assert getattr(t, col.name).dtype == np.dtype(col.dtype)
        lo, hi = col.bounds({**t.metadata, "domains": len(t.domains)})
        if col.kind == "int" and hi is not None:  # one past the range is refused, by name
            bad = getattr(t, col.name).astype(np.int64).copy()
            bad.flat[0] = hi + 1
            with pytest.raises(SimcacheError, match=f"'{col.name}' has value {hi + 1} outside|expert id {hi + 1}"):
                col.check(bad, {**t.metadata, "domains": len(t.domains)})
