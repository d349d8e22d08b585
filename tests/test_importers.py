"""Foreign tables: JSONL, other tools' Parquet, MoE-PolicyLang, the FLAME sample; composite
keys, several sources, .gz, layer renumbering, --on-gap."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import simcache
from simcache.cli import main
from simcache.importers import import_file, import_flame, import_sources

from .conftest import FLAME_RAW, require


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_per_layer(tmp_path):
    rows = [
        {"seq": 7, "tok": p, "lyr": l, "ids": [(p + l) % 4, (p + l + 1) % 4], "w": [0.6, 0.4], "domain": "code"}
        for p in range(3) for l in range(2)
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    t = import_file(path, request="seq", position="tok", layer="lyr", experts="ids", weights="w", num_experts=4)
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_experts) == (3, 2, 2, 4)
    np.testing.assert_array_equal(t.token_experts()[2, 1], [3, 0])
    assert t.domains == ("code",) and t.weights[0].tolist() == pytest.approx([0.6, 0.4])
    assert t.metadata["request_keys"] == {"fields": ["seq"], "values": [[7]]}
    assert not t.has_missing


def test_jsonl_per_token_lists_and_guessed_fields(tmp_path):
    lines = [{"request": r, "experts": [[r, 3], [2, 3], [0, 3]]} for r in (0, 0, 1)]
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    t = import_file(path)
    assert (t.num_tokens, t.num_layers, t.num_experts) == (3, 3, 4)
    assert t.position.tolist()[:6] == [0, 0, 0, 1, 1, 1]


def public_like_pair(tmp_path, drop=0.01, seed=0, layers=32, tokens=(40, 30)):
    """Two files shaped like the public vLLM Mixtral decode trace (dataset, problem_id, layer,
    token_idx, experts, gating_probs), both reusing problem_id 0 and 1, with ~1 % of the
    (token, layer) records removed at random. Returns the paths and the full records kept."""
    rng = np.random.default_rng(seed)
    kept = []
    paths = []
    for name in ("gsm8k", "humaneval"):
        rows = []
        for pid, n in enumerate(tokens):
            for t in range(n):
                for l in range(layers):
                    e = rng.choice(8, 2, replace=False)
                    rec = {"dataset": name, "problem_id": pid, "layer": l, "token_idx": t,
                           "experts": e.tolist(), "gating_probs": [0.7, 0.3]}
                    if rng.random() < drop:
                        continue
                    rows.append(rec)
        rng.shuffle(rows)  # profilers write records in no particular order
        kept.append(rows)
        paths.append(write_jsonl(tmp_path / f"{name}.jsonl", rows))
    return paths, kept


def test_public_pair_imports_with_one_command(tmp_path):
    (a, b), kept = public_like_pair(tmp_path)
    out = tmp_path / "mixtral.parquet"
    res = CliRunner().invoke(main, ["import", str(a), str(b), str(out), "--request", "dataset,problem_id",
                                    "--position", "token_idx", "--layer", "layer", "--experts", "experts",
                                    "--weights", "gating_probs"])
    assert res.exit_code == 0, res.output
    missing = 2 * 70 * 32 - sum(len(k) for k in kept)
    assert missing > 0
    assert f"on-gap keep: {missing:,} (token, layer) rows" in res.output
    t = simcache.read_trace(out)
    assert t.num_requests == 4 and t.num_tokens == 140 and int(t.gap_rows.sum()) == missing
    # ids in order of first appearance across the sources as given, key values kept
    assert t.metadata["request_keys"]["fields"] == ["dataset", "problem_id"]
    first = [[r["dataset"], r["problem_id"]] for rows in kept for r in rows]
    seen = list(dict.fromkeys(map(tuple, first)))
    assert [tuple(v) for v in t.metadata["request_keys"]["values"]] == seen
    # every kept record is in the trace, at its request / position / layer
    ids = {tuple(v): i for i, v in enumerate(t.metadata["request_keys"]["values"])}
    E = t.token_experts()
    tok = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(t.token_request(), t.token_position()))}
    for rows in kept:
        for r in rows[:200]:
            i = tok[(ids[(r["dataset"], r["problem_id"])], r["token_idx"])]
            assert E[i, r["layer"]].tolist() == r["experts"]
    info = CliRunner().invoke(main, ["info", str(out)])
    assert f"{missing:,} gap rows" in info.output


def test_reused_ids_without_composite_key_say_what_to_do(tmp_path):
    (a, b), _ = public_like_pair(tmp_path, drop=0.0, layers=2, tokens=(3, 3))
    with pytest.raises(simcache.SimcacheError, match="appears twice.*--request A,B"):
        import_sources([a, b], request="problem_id", position="token_idx")


def test_on_gap_choices_count_what_they_touch(tmp_path):
    rows = [{"request": 0, "position": p, "layer": l, "experts": [p % 3, 3]}
            for p in range(4) for l in range(2) if (p, l) != (2, 1)]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    t, rep = import_sources([path], on_gap="keep")
    assert rep.gap_rows == 1 and int(t.gap_rows.sum()) == 1 and t.num_tokens == 4
    t, rep = import_sources([path], on_gap="drop-token")
    assert (rep.dropped_tokens, rep.dropped_rows, t.num_tokens) == (1, 2, 3) and not t.has_missing
    assert "removed 1 tokens (2 rows)" in rep.lines()[-1]
    with pytest.raises(simcache.SimcacheError, match=r"position 2\) has no record at layer 1"):
        import_sources([path], on_gap="error")


def test_gz_input_and_layers_from_2_renumbered(tmp_path):
    rows = [{"request": 0, "position": p, "layer": l, "experts": [l, 5]} for p in range(3) for l in (2, 3, 4)]
    path = tmp_path / "f.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    t, rep = import_sources([path])
    assert t.num_layers == 3 and t.metadata["source_first_layer"] == 2
    assert "source layer 2 is MoE layer 0" in rep.lines()[0]
    np.testing.assert_array_equal(t.token_experts()[0, :, 0], [2, 3, 4])


def test_variable_number_of_experts_pads_with_minus_one(tmp_path):
    rows = [{"layer": 0, "experts": [0, 1, 2]}, {"layer": 0, "experts": [3]}]
    t, rep = import_sources([write_jsonl(tmp_path / "v.jsonl", rows)])
    assert t.top_k == 3 and t.experts[1].tolist() == [3, -1, -1] and rep.padded_rows == 1


def test_moe_policylang_parquet(tmp_path):
    """MoE-PolicyLang columns, with the dense router_softmax its replay reads."""
    n = 4
    soft = np.random.default_rng(0).dirichlet(np.ones(8), size=n).astype(np.float32)
    sel = np.argsort(-soft, axis=1)[:, :2]
    table = pa.table({
        "prompt_id": [0, 0, 1, 1], "token_idx": [0, 1, 0, 1], "layer_idx": [0, 0, 0, 0],
        "selected_experts": sel.tolist(), "router_softmax": soft.tolist(),
    })
    pq.write_table(table, tmp_path / "p.parquet")
    t = import_file(tmp_path / "p.parquet")
    assert t.num_experts == 8 and t.num_requests == 2
    np.testing.assert_array_equal(t.experts, sel)
    np.testing.assert_allclose(t.weights, np.take_along_axis(soft, sel, 1))


def policylang_recording(n_prompts=2, tokens=5, layers=3, E=8, k=2, seed=0):
    """A TraceRecording built with MoE-PolicyLang's own classes, so that its own writer
    (save_parquet / save_jsonl) produces the files."""
    from moe_policylang.integrations.trace_recorder import TraceEntry, TraceRecording

    rng = np.random.default_rng(seed)
    entries = []
    for p in range(n_prompts):
        for t in range(tokens):
            for l in range(layers):
                sm = rng.dirichlet(np.ones(E))
                sel = np.argsort(-sm)[:k]
                entries.append(TraceEntry(prompt_id=p, token_idx=t, layer_idx=l,
                                          selected_experts=[int(x) for x in sel],
                                          router_scores=[float(sm[x]) for x in sel],
                                          router_softmax=[float(x) for x in sm],
                                          phase="prefill" if t < 2 else "decode", domain_tag="code"))
    return TraceRecording(model_name="policylang-test", num_layers=layers, num_experts=E, top_k=k,
                          entries=entries, records_full_softmax=True)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_moe_policylang_files_from_its_own_writer(tmp_path, suffix):
    pytest.importorskip("moe_policylang")
    rec = policylang_recording()
    path = tmp_path / f"trace{suffix}"
    rec.save(path)  # MoE-PolicyLang picks save_parquet / save_jsonl by suffix
    res = CliRunner().invoke(main, ["import", str(path), str(tmp_path / "out.parquet")])
    assert res.exit_code == 0, res.output
    t = simcache.read_trace(tmp_path / "out.parquet")
    assert (t.num_requests, t.num_tokens, t.num_layers, t.top_k) == (2, 10, 3, 2)
    assert t.num_experts == 8
    assert int((t.token_phase() == 0).sum()) == 4 and t.domains == ("code",)
    by_key = {(e.prompt_id, e.token_idx, e.layer_idx): e for e in rec.entries}
    for i in range(t.num_rows):
        e = by_key[(int(t.request[i]), int(t.position[i]), int(t.layer[i]))]
        assert t.experts[i].tolist() == e.selected_experts
        np.testing.assert_allclose(t.weights[i], e.router_scores, rtol=1e-6)
    if suffix == ".jsonl":
        assert t.model == "policylang-test"


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"a": 1}\n', "no experts column"),
        ('not json\n', "not a JSON object per line"),
        ('{"experts": [0, 1]}\n', "no layer column"),
        ('{"experts": [0, 1], "layer": 0, "position": 0}\n{"experts": [0, 2], "layer": 0, "position": 0}\n',
         r"bad.jsonl, record 2: token \(request 0, position 0\) appears twice"),
        ('{"experts": [0, 9], "layer": 0}\n', "expert id 9 is outside"),
        ('{"experts": [0, 1], "layer": 0, "position": null}\n', "record 1: 'position' is null"),
        ('{"experts": [0, 1], "layer": 0, "phase": "warmup"}\n', "phase 'warmup'"),
        ('{"experts": [0, 99999999999], "layer": 0}\n', "holds 1e\\+11, not an expert id"),
        ('{"experts": ["a", "b"], "layer": 0}\n', "'experts' does not hold numbers"),
    ],
)
def test_jsonl_errors(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(simcache.SimcacheError, match=message):
        import_sources([path], num_experts=4 if "9" in text else None)


def test_failed_import_leaves_no_output(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"experts": [0, 1], "layer": 0}\n{"experts": [0, 9], "layer": 0}\n')
    out = tmp_path / "out.parquet"
    res = CliRunner().invoke(main, ["import", str(path), str(out), "--num-experts", "4"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_flame_conversion():
    t = import_flame(require(FLAME_RAW))
    assert (t.num_layers, t.num_experts, t.top_k, t.num_tokens, t.num_requests) == (8, 64, 6, 2648, 61)
    raw = pq.read_table(FLAME_RAW).to_pandas()
    first = raw[(raw.stream_idx == 5) & (raw.layer == 3)].iloc[0]
    row = (t.request == 0) & (t.position == 5) & (t.layer == 1)
    np.testing.assert_array_equal(t.experts[row][0], first.experts)
    window = raw[(raw.stream_idx == 512 * 10 + 3) & (raw.layer == 9)].iloc[0]
    row = (t.request == 7) & (t.position == 3) & (t.layer == 7)
    np.testing.assert_array_equal(t.experts[row][0], window.experts)
