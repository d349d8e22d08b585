"""simcache analyze: analytic cases, the fork's published numbers, null models, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import simcache
from simcache.cli import main
from simcache.analysis import analyze, one_minus_abs_lambda2

from .conftest import SEED_MATRICES, require


def test_block_diagonal_chain_has_the_known_spectrum():
    """Two closed 2-expert blocks: P has eigenvalues {1, 1, 0, 0}, the graph two components."""
    C = np.kron(np.eye(2), np.ones((2, 2))) * 50
    rec = analyze(C[None], null_samples=3).layers[0]
    assert rec["one_minus_abs_lambda2"] == pytest.approx(0.0, abs=1e-12)
    assert rec["eigenvalue_moduli"] == pytest.approx([1, 1, 0, 0], abs=1e-12)
    assert rec["fiedler"] == pytest.approx(0.0, abs=1e-12)
    assert rec["scc_count"] == 2 and rec["communities"] == 2
    assert rec["modularity"] == pytest.approx(0.5)
    assert rec["stationary"] == pytest.approx([0.25] * 4)


def test_two_community_chain_is_recovered_from_a_trace():
    """A trace walking a chain with two communities (0-3 and 4-7, 2% crossings)."""
    E = 8
    counts = np.full((1, E, E), 0.02 / 4)
    counts[0, :4, :4] = counts[0, 4:, 4:] = 0.98 / 4
    t = simcache.synth(40, 200, transitions=counts * 1000, top_k=1, seed=3)
    rec = analyze(t, null_samples=10).layers[0]
    labels = np.array(rec["community_labels"])
    assert rec["communities"] == 2
    assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4]
    assert rec["fiedler"] < 0.1 < rec["fiedler_null"]["lo"]
    assert rec["modularity"] > rec["modularity_null"]["hi"]


def test_iid_routing_falls_inside_the_null_band():
    t = simcache.synth(60, 100, num_layers=2, num_experts=8, top_k=2, stickiness=0.0, noise=1.0, seed=5)
    a = analyze(t, null_samples=40, seed=1)
    inside = 0
    checked = 0
    for rec in a.layers:
        for name in ("repeat_top1", "overlap_any", "one_minus_abs_lambda2", "fiedler"):
            n = rec[name + "_null"]
            checked += 1
            inside += n["lo"] <= rec[name] <= n["hi"]
        assert abs(rec["repeat_top1"] - rec["repeat_top1_random"]) < 0.03
        assert abs(rec["overlap_any"] - rec["overlap_any_random"]) < 0.05
    assert inside >= checked - 1  # a 95% interval: at most one miss in eight is expected


def test_sticky_routing_leaves_the_null_band():
    t = simcache.synth(30, 100, num_layers=1, num_experts=8, top_k=2, stickiness=0.95, noise=0.0, seed=6)
    rec = analyze(t, null_samples=20).layers[0]
    assert rec["repeat_top1"] > rec["repeat_top1_null"]["hi"]
    assert rec["overlap_any"] > rec["overlap_any_null"]["hi"]


@pytest.mark.parametrize("name,middle,mean", [("mixtral", 0.858, 0.850), ("qwen", 0.497, 0.521),
                                               ("switch", 0.583, 0.661), ("deepseek", 0.925, 0.952)])
def test_the_forks_published_spectral_gaps(name, middle, mean):
    path = require(SEED_MATRICES / f"{name}_top1_transition_counts.npy")
    a = analyze(path, null_samples=0)
    assert a.layers[a.num_layers // 2]["one_minus_abs_lambda2"] == pytest.approx(middle, abs=5e-4)
    assert a.overall()["one_minus_abs_lambda2"] == pytest.approx(mean, abs=5e-4)


def test_all_zero_rows_are_reported():
    a = analyze(require(SEED_MATRICES / "switch_top1_transition_counts.npy"), null_samples=0)
    assert all(rec["zero_rows"] > 0 for rec in a.layers)
    assert all(np.isfinite(rec["one_minus_abs_lambda2"]) for rec in a.layers)


def test_transition_counts_match_the_trace():
    t = simcache.synth(5, 30, num_layers=2, num_experts=4, top_k=2, seed=2)
    a = analyze(t, null_samples=0)
    np.testing.assert_array_equal(a.counts, simcache.transition_counts(t))


@pytest.mark.parametrize("array,message", [
    (np.ones((4, 4)), "shape \\(layers, E, E\\)"),
    (np.ones((2, 3, 4)), "shape \\(layers, E, E\\)"),
    (-np.ones((1, 3, 3)), "non-negative"),
    (np.stack([np.ones((3, 3)), np.zeros((3, 3))]), "layer 1 has no transitions"),
])
def test_bad_count_arrays(array, message):
    with pytest.raises(simcache.SimcacheError, match=message):
        analyze(array)


def test_one_token_per_sequence_is_refused():
    t = simcache.synth(5, 1, num_layers=1, num_experts=4, top_k=1)
    with pytest.raises(simcache.SimcacheError, match="one token per sequence"):
        analyze(t)


def test_domain_use():
    t = simcache.Trace.from_arrays(np.array([[0], [0], [1], [2]]), request=[0, 0, 1, 1], position=[0, 1, 0, 1],
                                   layer=[0] * 4, num_experts=4, domain=["code", "code", "poetry", "poetry"])
    d = analyze(t, null_samples=0).domains
    assert d["by_domain"]["code"]["max_share_by_layer"] == [1.0]
    assert d["by_domain"]["poetry"]["max_share_by_layer"] == [0.5]


def test_cli_json_and_plots(tmp_path):
    path = require(SEED_MATRICES / "mixtral_top1_transition_counts.npy")
    out = CliRunner().invoke(main, ["analyze", str(path), "--null", "5", "--json", "--plots", str(tmp_path)])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    rec = data["layers"][16]
    for key in ("layer", "repeat_top1", "repeat_top1_random", "overlap_any", "overlap_any_random",
                "one_minus_abs_lambda2", "fiedler", "scc_count", "one_minus_abs_lambda2_null", "fiedler_null",
                "scc_count_null", "repeat_top1_null"):
        assert key in rec
    assert rec["one_minus_abs_lambda2"] == pytest.approx(0.858, abs=5e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "communities.png", "locality.png", "spectra.png", "structure.png", "transitions.png"]


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((3, 3)))
    out = CliRunner().invoke(main, ["analyze", str(bad)])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and out.output.startswith("Error: ")


def test_helper():
    assert one_minus_abs_lambda2(np.eye(2)) == 0.0
