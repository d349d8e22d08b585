"""Missing records (trace schema 1.1): reading and writing, the workload's demand, analysis.

The first test is the acceptance check of the gap work: a gappy import simulated with
per-layer LRU at batch 1 equals a plain reference that skips the missing records, access for
access. It pins the demand semantics for any rewrite of the workload builder.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pyarrow.parquet as pq
import pytest

import simcache
from simcache.analysis import analyze
from simcache.importers import import_sources
from simcache.trace import METADATA_KEY
from simcache.transitions import transition_counts
from simcache.workload import Workload, demand, schedule

from .test_importers import public_like_pair


def lru_skipping_missing(kept, capacity, layers):
    """Per-layer LRU at batch 1 straight from the kept JSON records: requests in order of first
    appearance, tokens in position order, and a (token, layer) with no record does nothing.
    Within a token a layer's experts are served in ascending order and pinned against each
    other (docs/design.md §4). Returns the outcome of every access (0 hit, 1 fill)."""
    order, records = {}, {}
    for rows in kept:
        for r in rows:
            key = (r["dataset"], r["problem_id"])
            order.setdefault(key, len(order))
            records[(order[key], r["token_idx"], r["layer"])] = r["experts"]
    tokens = sorted({(q, t) for q, t, _ in records})
    caches = [OrderedDict() for _ in range(layers)]
    out = []
    for q, t in tokens:
        for l in range(layers):
            experts = records.get((q, t, l))
            if experts is None:
                continue  # a missing record demands nothing
            group = sorted(experts)
            cache = caches[l]
            for e in group:
                if e in cache:
                    cache.move_to_end(e)
                    out.append(0)
                    continue
                if len(cache) >= capacity:
                    victim = next(x for x in cache if x not in group)
                    del cache[victim]
                cache[e] = True
                out.append(1)
    return np.array(out, np.int8)


@pytest.mark.parametrize("capacity", [2, 3, 6])
def test_gappy_import_lru_equals_reference_that_skips_missing(tmp_path, capacity):
    (a, b), kept = public_like_pair(tmp_path, drop=0.01, seed=3)
    trace, report = import_sources([a, b], request="dataset,problem_id", position="token_idx",
                                   layer="layer", experts="experts", weights="gating_probs")
    assert report.gap_rows > 0
    out = tmp_path / "t.parquet"
    simcache.write_trace(trace, out)
    t = simcache.read_trace(out)
    r = simcache.simulate(t, "lru", capacity, batch=1, record=True)
    ref = lru_skipping_missing(kept, capacity, t.num_layers)
    assert r.accesses == ref.size == sum(len(x) for x in kept) * 2
    np.testing.assert_array_equal(r.decisions.outcome, ref)


def test_gap_and_padding_rows_demand_only_real_experts():
    t = simcache.Trace.from_arrays(
        np.array([[0, 1], [-1, -1], [2, -1], [2, 3]]), request=[0, 0, 0, 0], position=[0, 0, 1, 1],
        layer=[0, 1, 0, 1], num_experts=4)
    assert t.has_missing and t.gap_rows.tolist() == [False, True, False, False]
    assert t.padded_rows.tolist() == [False, False, True, False]
    d = demand(t, schedule(t))
    groups = [d.keys[d.group_ptr[g]:d.group_ptr[g + 1]].tolist() for g in range(4)]
    assert groups == [[0, 1], [], [2], [4 + 2, 4 + 3]]
    assert d.tokens.tolist() == [1, 1, 1, 1, 1]
    s = t.summary()
    assert (s["gap_rows"], s["padded_rows"]) == (1, 1)


def test_schema_version_written_only_when_needed(tmp_path):
    full = simcache.Trace.from_arrays(np.array([[0, 1], [1, 2]]), request=[0, 0], position=[0, 1],
                                      layer=[0, 0], num_experts=4)
    gappy = simcache.Trace.from_arrays(np.array([[0, 1], [-1, -1]]), request=[0, 0], position=[0, 1],
                                       layer=[0, 0], num_experts=4)
    for trace, version in ((full, 1), (gappy, 1.1)):
        path = tmp_path / f"v{version}.parquet"
        simcache.write_trace(trace, path)
        meta = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
        assert meta["schema_version"] == version
        back = simcache.read_trace(path)
        np.testing.assert_array_equal(back.experts, trace.experts)


def test_minus_one_in_a_v1_file_is_refused(tmp_path):
    gappy = simcache.Trace.from_arrays(np.array([[0, 1], [-1, -1]]), request=[0, 0], position=[0, 1],
                                       layer=[0, 0], num_experts=4)
    path = tmp_path / "t.parquet"
    simcache.write_trace(gappy, path)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["schema_version"] = 1
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), path)
    with pytest.raises(simcache.SimcacheError, match=r"expert id -1 is outside \[0, 4\)"):
        simcache.read_trace(path)


def test_an_id_after_minus_one_is_refused():
    with pytest.raises(simcache.SimcacheError, match=r"expert after a -1: \[-1, 2\]"):
        simcache.Trace.from_arrays(np.array([[-1, 2]]), request=[0], position=[0], layer=[0], num_experts=4)


def test_analysis_skips_transitions_across_gaps():
    # request 0: tokens 0..3 at one layer; token 2 has no record
    top1 = [1, 1, -1, 1]
    experts = np.array([[e, -1] if e < 0 else [e, 0] for e in top1])
    experts[2] = [-1, -1]
    t = simcache.Trace.from_arrays(experts, request=[0] * 4, position=[0, 1, 2, 3], layer=[0] * 4,
                                   num_experts=4)
    a = analyze(t, null_samples=0)
    rec = a.layers[0]
    assert rec["transitions"] == 1 and rec["skipped_gap_pairs"] == 2
    assert rec["repeat_top1"] == 1.0 and rec["overlap_any"] == 1.0
    C = transition_counts(t)[0]
    assert C.sum() == 1 and C[1, 1] == 1


def test_gappy_demand_is_full_demand_without_the_missing_records():
    """The demand of a gappy trace equals that of the full trace with those records removed
    from each group: only the missing experts disappear."""
    rng = np.random.default_rng(1)
    t = simcache.synth(3, 8, num_layers=3, num_experts=6, top_k=2, seed=1)
    experts = t.experts.copy()
    holes = rng.random(t.num_rows) < 0.2
    experts[holes] = -1
    g = simcache.Trace.from_arrays(experts, t.request, t.position, t.layer, num_experts=6)
    full, gappy = Workload(t, 2).demand, Workload(g, 2).demand
    holes_tok = holes.reshape(t.num_tokens, t.num_layers)
    steps = schedule(t, 2)
    for s in range(steps.num_steps):
        toks = steps.step_tokens[steps.step_ptr[s]:steps.step_ptr[s + 1]]
        for l in range(3):
            want = sorted({int(e) for tok in toks if not holes_tok[tok, l]
                           for e in t.token_experts()[tok, l]})
            gi = s * 3 + l
            got = (gappy.keys[gappy.group_ptr[gi]:gappy.group_ptr[gi + 1]] - l * 6).tolist()
            assert got == want
    assert gappy.num_accesses < full.num_accesses


from collections import Counter  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from . import naive  # noqa: E402
from .strategies import traces  # noqa: E402


@st.composite
def gappy_traces(draw):
    """A small trace where some rows lost their record and some keep only their first ids."""
    t = draw(traces())
    experts = t.experts.astype(np.int64)
    for i in range(t.num_rows):
        keep = draw(st.integers(0, t.top_k)) if draw(st.booleans()) else t.top_k
        experts[i, keep:] = -1
    return simcache.Trace.from_arrays(experts, t.request, t.position, t.layer, phase=t.phase,
                                      num_experts=t.num_experts)


@settings(max_examples=60, deadline=None)
@given(gappy_traces(), st.integers(1, 4), st.sampled_from(["skip", "step"]))
def test_demand_skips_missing_records_for_any_batch(trace, batch, prefill):
    """Whole demand stream against a plain reference (tests/naive.py's schedule; ids < 0 demand
    nothing), for the workload builder and any rewrite of it."""
    steps = naive.schedule(trace, batch, prefill)
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    ex = trace.experts.reshape(-1, L, k)
    keys, tokens, sizes = [], [], []
    for step in steps:
        for l in range(L):
            c = Counter(e for t, _ in step for e in ex[t, l].tolist() if e >= 0)
            keys += [l * E + e for e in sorted(c)]
            tokens += [c[e] for e in sorted(c)]
            sizes.append(len(c))
    if not keys:
        return  # nothing to simulate (the Workload refuses it)
    d = Workload(trace, batch, prefill).demand
    np.testing.assert_array_equal(np.diff(d.group_ptr), sizes)
    np.testing.assert_array_equal(d.keys, keys)
    np.testing.assert_array_equal(d.tokens, tokens)


def test_analyze_and_info_commands_report_gaps(tmp_path):
    from click.testing import CliRunner

    from simcache.cli import main

    t = simcache.synth(3, 12, num_layers=2, num_experts=6, top_k=2, seed=2)
    experts = t.experts.copy()
    experts[5] = -1  # a gap
    experts[8, 1] = -1  # a padded row
    g = simcache.Trace.from_arrays(experts, t.request, t.position, t.layer, num_experts=6)
    path = tmp_path / "g.parquet"
    simcache.write_trace(g, path)
    skipped = sum(r["skipped_gap_pairs"] for r in analyze(g, null_samples=0).layers)
    assert skipped == 2  # the gap row's token pairs with its neighbours at that layer
    res = CliRunner().invoke(main, ["analyze", str(path), "--null", "2"])
    assert res.exit_code == 0 and f"gaps: {skipped:,} (token pair, layer) transitions skipped" in res.output
    res = CliRunner().invoke(main, ["info", str(path)])
    assert "1 gap rows" in res.output and "1 padded rows" in res.output


@pytest.mark.parametrize("evict,admit", [("lru", "markov"), ("markov", "markov-h"), ("belady", "oracle")])
def test_learners_and_twins_on_a_gappy_trace(evict, admit):
    """Gap rows demand nothing and teach the Markov learner nothing (a pair across a gap is not
    a transition): the kernel equals its twin access by access on a trace with gaps."""
    from . import naive
    from .conftest import random_trace
    from .test_twins import compare

    t = random_trace(5, layers=2, experts=6, top_k=2, requests=4, length=(8, 14))
    ex = t.experts.copy()
    rng = np.random.default_rng(0)
    gone = rng.random(ex.shape[0]) < 0.15
    ex[gone] = -1
    g = simcache.Trace.from_arrays(ex, request=t.request, position=t.position, layer=t.layer,
                                   phase=t.phase, num_experts=t.num_experts, expert_bytes=1 << 20)
    assert (g.experts == -1).all(axis=1).sum() == gone.sum()
    r = compare(g, evict, admit, 2, batch=2, decay_every=3, decay=0.9, tau=0.2)
    assert r.accesses == sum(len(a) for _, _, a in naive.accesses(g, naive.schedule(g, 2)))
