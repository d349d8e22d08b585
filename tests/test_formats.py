"""Engine formats, each from a fixture built after the format's documented structure in the
engine's source (named in each fixture), round-tripped: import -> info -> simulate."""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import simcache
from simcache.cli import main
from simcache.importers import detect_format, import_sources
from simcache.workload import Workload

torch = pytest.importorskip("torch")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def roundtrip(src, tmp_path, *extra):
    out = tmp_path / "out.parquet"
    res = run("import", *src, out, *extra)
    assert res.exit_code == 0, res.output
    info = run("info", out, "--json")
    assert info.exit_code == 0, info.output
    sim = run("simulate", out, "--policy", "lru", "--capacity", "2")
    assert sim.exit_code == 0, sim.output
    return simcache.read_trace(out), json.loads(info.output), res.output


# ---- SGLang expert-distribution recorder, per_token -------------------------------------

# Built after sgl-project/sglang python/sglang/srt/eplb/expert_distribution.py:
# _DetailSinglePassGatherer.collect() gives each record input_ids, positions, extend_seq_lens,
# forward_mode (ForwardMode.value: EXTEND 1, DECODE 2 in forward_batch_info.py),
# topk_ids_of_layer [layers, tokens, 8] int32 reset to -1 before the pass;
# _DetailAccumulator.append adds forward_pass_id, rank, gatherer_key; dump() torch.saves
# {"records": [...], "last_physical_to_logical_map": [layers, physical experts]}.
SG_E, SG_PHYS, SG_K = 8, 10, 2
# two interleaved requests: A's prompt, A decodes, B's prompt, then both decode, then B alone
SG_PASSES = [
    ("extend", [("A", 0, 3)]),
    ("decode", [("A", 3)]),
    ("extend", [("B", 0, 2)]),
    ("decode", [("A", 4), ("B", 2)]),
    ("decode", [("A", 5), ("B", 3)]),
    ("decode", [("B", 4)]),
]


def sglang_dump(path, passes=SG_PASSES, layers=3, dense=(0,), seed=0, rank=0):
    """Layer 0 is dense (no routing: all -1), as DeepSeek's first layers are. Physical experts
    8 and 9 replicate logical 2 and 5. Returns the expected logical experts per (request,
    position, moe layer) and the tokens of every pass."""
    rng = np.random.default_rng(seed)
    phys_map = np.tile(np.r_[np.arange(SG_E), 2, 5], (layers, 1)).astype(np.int64)
    records, expected, tokens_of_pass = [], {}, []
    for fp, (mode, items) in enumerate(passes):
        toks = []
        lens = None
        if mode == "extend":
            lens = []
            for name, start, n in items:
                toks += [(name, start + i) for i in range(n)]
                lens.append(n)
        else:
            toks = list(items)
        T = len(toks)
        ids = torch.full((layers, T, 8), -1, dtype=torch.int32)
        for l in range(layers):
            if l in dense:
                continue
            for t, key in enumerate(toks):
                logical = rng.choice(SG_E, SG_K, replace=False)
                phys = [8 if e == 2 and rng.random() < 0.5 else 9 if e == 5 else int(e) for e in logical]
                ids[l, t, :SG_K] = torch.tensor(phys, dtype=torch.int32)
                expected[(key, l - len([d for d in dense if d < l]))] = logical.tolist()
        records.append(dict(
            forward_pass_id=fp, rank=rank, gatherer_key="primary",
            input_ids=[100 + i for i in range(T)], positions=[p for _, p in toks],
            extend_seq_lens=lens, forward_mode=1 if mode == "extend" else 2,
            topk_ids_of_layer=ids, misc_objects=[], global_physical_count=torch.zeros(layers, SG_PHYS),
        ))
        tokens_of_pass.append(toks)
    torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(phys_map)}, path)
    return expected, tokens_of_pass


def test_sglang_dump_roundtrip_and_recorded_batches(tmp_path):
    src = tmp_path / "expert_distribution_recorder_1700000000.0_0.pt"
    expected, passes = sglang_dump(src)
    assert detect_format(src) == "sglang"
    t, info, out = roundtrip([src], tmp_path)
    assert (info["num_layers"], info["num_experts"], info["top_k"]) == (2, 8, 2)
    assert (info["requests"], info["tokens"], info["gap_rows"]) == (2, 11, 0)
    assert (info["prefill_tokens"], info["decode_tokens"]) == (5, 6)
    assert info["metadata"]["dense_layers_left_out"] == [0]
    names = {"A": 0, "B": 1}  # requests rebuilt in order of first appearance
    E = t.token_experts()
    for i, (r, p) in enumerate(zip(t.token_request(), t.token_position())):
        name = "AB"[r]
        for l in range(2):
            assert E[i, l].tolist() == expected[((name, int(p)), l)]  # physical ids mapped
    tok = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(t.token_request(), t.token_position()))}
    for prefill, kept in (("step", passes), ("skip", [ps for ps, (m, _) in zip(passes, SG_PASSES) if m == "decode"])):
        w = Workload(t, "recorded", prefill)
        steps = [w.steps.step_tokens[w.steps.step_ptr[s]:w.steps.step_ptr[s + 1]].tolist()
                 for s in range(w.steps.num_steps)]
        assert steps == [[tok[(names[n], p)] for n, p in ps] for ps in kept]
    res = run("simulate", tmp_path / "out.parquet", "--batch", "recorded", "--capacity", "2", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)["results"][0]
    assert r["steps"] == 4 and r["batch"] == "recorded"


def test_batch_recorded_needs_the_step_column(tmp_path):
    path = tmp_path / "t.parquet"
    simcache.write_trace(simcache.synth(2, 4, num_layers=1, num_experts=4, top_k=1), path)
    res = run("simulate", path, "--batch", "recorded")
    assert res.exit_code == 1 and "needs the recorded forward passes" in res.output


def _bad_sglang(tmp_path, change):
    src = tmp_path / "bad.pt"
    sglang_dump(src)
    data = torch.load(src, weights_only=True)
    change(data)
    torch.save(data, src)
    return src


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("last_physical_to_logical_map"), "lacks 'last_physical_to_logical_map'"),
    (lambda d: d["records"][2].pop("positions"), r"bad.pt, record 2: lacks 'positions'"),
    (lambda d: d["records"][1].update(topk_ids_of_layer=torch.zeros(3, 8, dtype=torch.int32)),
     r"record 1: topk_ids_of_layer must be \[layers, tokens, k\]"),
    (lambda d: d["records"][3]["topk_ids_of_layer"].__setitem__((1, 0, 0), 12),
     r"record 3: physical expert 12 \(layer 1, token 0\) has no logical mapping"),
    (lambda d: d["last_physical_to_logical_map"].__setitem__((1, 9), -1) or
     d["records"][0]["topk_ids_of_layer"].__setitem__((1, 0, 0), 9),
     r"physical expert 9 at layer 1 maps to no logical expert"),
    (lambda d: d["records"][0].update(extend_seq_lens=[2]), r"extend_seq_lens \[2\] do not add up to 3"),
    (lambda d: d["records"][1].update(forward_mode=5), "forward mode 5"),
])
def test_sglang_malformed(tmp_path, change, message):
    src = _bad_sglang(tmp_path, change)
    out = tmp_path / "out.parquet"
    res = run("import", src, out)
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "Error: " in res.output and __import__("re").search(message, res.output), res.output
    assert not out.exists()


def test_sglang_not_a_dump(tmp_path):
    src = tmp_path / "x.pt"
    src.write_bytes(b"not a torch file")
    with pytest.raises(simcache.SimcacheError, match="is not a torch.save file"):
        import_sources([src])


# ---- routed_experts (vLLM / SGLang --enable-return-routed-experts) ------------------------

# Built after sgl-project/sglang python/sglang/srt/layers/moe/routed_experts_capturer.py (an
# int32 buffer [tokens, num_hidden_layers, num_experts_per_tok]) and the payload that
# meta_info["routed_experts"] carries (base64 of those int32 bytes; sgl-project/sglang-jax
# docs/features/return_routed_experts.md): prompt + completion - 1 tokens.
def routed_response(rid, prompt, completion, cached, layers=3, k=2, E=8, seed=0):
    rng = np.random.default_rng(seed)
    T = prompt + completion - 1
    a = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(layers)]) for _ in range(T)])
    a[:, 0, :] = 0  # a dense hidden layer: never written, left at the buffer's zeros
    a = a.astype(np.int32)
    meta = {"id": rid, "prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached,
            "routed_experts": base64.b64encode(a.tobytes()).decode()}
    return {"text": "...", "meta_info": meta}, a


def test_routed_experts_jsonl_roundtrip(tmp_path):
    r1, a1 = routed_response("req-a", 4, 5, 0, seed=1)
    r2, a2 = routed_response("req-b", 3, 3, 2, seed=2)
    src = tmp_path / "responses.jsonl"
    src.write_text(json.dumps(r1) + "\n" + json.dumps(r2) + "\n")
    assert detect_format(src) == "routed-experts"
    t, info, out = roundtrip([src], tmp_path, "--top-k", "2")
    assert (info["num_layers"], info["top_k"], info["requests"], info["tokens"]) == (2, 2, 2, 8 + 5)
    assert (info["prefill_tokens"], info["decode_tokens"]) == (4 + 3, 4 + 2)
    assert info["gap_rows"] == 2 * 2  # req-b's two prefix-cached prompt tokens, at both MoE layers
    assert info["metadata"]["dense_layers_left_out"] == [0]
    assert info["metadata"]["request_keys"]["values"] == [["req-a"], ["req-b"]]
    E = t.token_experts()
    np.testing.assert_array_equal(E[:8], a1[:, 1:, :])
    np.testing.assert_array_equal(E[8 + 2:], a2[2:, 1:, :])
    assert (E[8:10] == -1).all()
    assert Workload(t, 1).demand.num_accesses == (4 + 2) * 2 * 2  # decode tokens x layers x k
    # req-b's prefill step holds its 3 prompt tokens; the 2 cached ones demand nothing
    w = Workload(t, 1, "step")
    d, L = w.demand, 2
    step = next(s for s in range(w.steps.num_steps) if w.steps.step_tokens[w.steps.step_ptr[s]] == 8)
    for l in range(L):
        g = step * L + l
        assert (d.keys[d.group_ptr[g]:d.group_ptr[g + 1]] - l * 8).tolist() == sorted(a2[2, l + 1])


def test_routed_experts_npy_folder(tmp_path):
    _, a1 = routed_response("x", 4, 2, 0, seed=3)
    _, a2 = routed_response("y", 2, 2, 0, seed=4)
    d = tmp_path / "routed"
    d.mkdir()
    np.save(d / "req0.npy", a1)
    np.save(d / "req1.npy", a2)
    (d / "req0.json").write_text(json.dumps({"prompt_tokens": 4}))
    t, info, _ = roundtrip([d], tmp_path)
    assert (info["requests"], info["tokens"], info["prefill_tokens"]) == (2, 5 + 3, 4)
    np.testing.assert_array_equal(t.token_experts()[5:], a2[:, 1:, :])


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r["meta_info"].pop("routed_experts"), "line 1: no routed_experts"),
    (lambda r: r["meta_info"].update(routed_experts="***"), "line 1: routed_experts is not valid base64"),
    (lambda r: r["meta_info"].update(completion_tokens=9), r"line 1: 36 ids do not reshape to \[12 tokens"),
])
def test_routed_experts_malformed(tmp_path, mutate, message):
    r, _ = routed_response("a", 4, 3, 0)
    mutate(r)
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(r) + "\n")
    with pytest.raises(simcache.SimcacheError, match=message):
        import_sources([src], fmt="routed-experts", top_k=2)


def test_routed_experts_flat_payload_needs_top_k(tmp_path):
    r, _ = routed_response("a", 4, 3, 0)
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(r) + "\n")
    with pytest.raises(simcache.SimcacheError, match="give the model's top-k"):
        import_sources([src])


# ---- llama.cpp moe-trace CSV ----------------------------------------------------------------

# Built after the layout docs/design.md §14 gives (pos,layer,id_1..id_k, pos < 0 = prompt); no writer
# was found in the ggml-org/llama.cpp sources stored here (see simcache/importers/llamacpp.py).
def llama_csv(path, prompt=3, gen=4, blocks=(1, 2, 3), k=2, E=16, seed=0, header=True):
    rng = np.random.default_rng(seed)
    lines = ["pos,layer," + ",".join(f"id_{i + 1}" for i in range(k))] if header else []
    expected = {}
    for i, pos in enumerate(list(range(-prompt, 0)) + list(range(gen))):
        for b in blocks:
            ids = rng.choice(E, k, replace=False)
            expected[(i, b)] = ids.tolist()
            lines.append(f"{pos},{b}," + ",".join(map(str, ids)))
    path.write_text("\n".join(lines) + "\n")
    return expected


def test_llama_cpp_csv_roundtrip(tmp_path):
    a, b = tmp_path / "run1.csv", tmp_path / "run2.csv"
    ea = llama_csv(a, seed=1)
    llama_csv(b, prompt=2, gen=2, seed=2, header=False)
    t, info, out = roundtrip([a, b], tmp_path, "--num-experts", "16")
    assert (info["num_layers"], info["num_experts"], info["top_k"]) == (3, 16, 2)
    assert (info["requests"], info["tokens"], info["prefill_tokens"]) == (2, 7 + 4, 3 + 2)
    assert (info["gap_rows"], info["padded_rows"]) == (0, 0)
    assert "source layer 1 is MoE layer 0" in out
    E = t.token_experts()
    for (i, blk), ids in ea.items():
        assert E[i, blk - 1].tolist() == ids


@pytest.mark.parametrize("line,message", [
    ("0,1,3", r"bad.csv, line 3: 1 expert ids, the first record has 2"),
    ("0,1,3,x", r"bad.csv, line 3: field 4 is not an integer"),
    ("0,1,3,99", r"expert id 99 is outside \[0, 16\)"),
])
def test_llama_cpp_malformed(tmp_path, line, message):
    src = tmp_path / "bad.csv"
    src.write_text("pos,layer,id_1,id_2\n-1,1,0,1\n" + line + "\n")
    with pytest.raises(simcache.SimcacheError, match=message):
        import_sources([src], num_experts=16)


# ---- FLAME-MoE-Traces layout ----------------------------------------------------------------

# Built after the layout the FLAME-MoE-Traces dataset card and the DynaNDE-Simulator copy
# describe (/work/shared/traces/raw/flame-moe-290m/README.md): samples/NNN.parquet (token_id),
# actives/iter_NNNN/layer_NN.parquet (scores, indices); row order of the layer files follows
# the samples (an assumption: see simcache/importers/flame.py).
def flame_folder(root, lengths=(5, 4), layers=(2, 3, 4), k=6, E=64, seed=0, iters=(100, 5473)):
    rng = np.random.default_rng(seed)
    (root / "samples").mkdir(parents=True)
    for i, n in enumerate(lengths):
        pq.write_table(pa.table({"token_id": rng.integers(0, 50000, n)}), root / "samples" / f"{i:03d}.parquet")
    n = sum(lengths)
    expected = {}
    for it in iters:
        d = root / "actives" / f"iter_{it:04d}"
        d.mkdir(parents=True)
        for l in layers:
            idx = np.stack([rng.choice(E, k, replace=False) for _ in range(n)])
            sc = rng.random((n, k)).astype(np.float32)
            pq.write_table(pa.table({"scores": sc.tolist(), "indices": idx.tolist()}), d / f"layer_{l:02d}.parquet")
            expected[(it, l)] = idx
    return expected


def test_flame_traces_folder_roundtrip(tmp_path):
    root = tmp_path / "flame"
    expected = flame_folder(root)
    assert detect_format(root) == "flame-traces"
    t, info, out = roundtrip([root], tmp_path, "--num-experts", "64")
    assert (info["num_layers"], info["num_experts"], info["top_k"], info["requests"], info["tokens"]) == (3, 64, 6, 2, 9)
    assert info["metadata"]["flame_iteration"] == 5473 and "source layer 2 is MoE layer 0" in out
    assert (info["gap_rows"], info["padded_rows"]) == (0, 0)
    for l in (2, 3, 4):
        np.testing.assert_array_equal(t.token_experts()[:, l - 2], expected[(5473, l)])


def test_flame_traces_row_count_mismatch(tmp_path):
    root = tmp_path / "flame"
    flame_folder(root, iters=(7,))
    pq.write_table(pa.table({"scores": [[0.1] * 6], "indices": [[1, 2, 3, 4, 5, 6]]}),
                   root / "actives" / "iter_0007" / "layer_03.parquet")
    with pytest.raises(simcache.SimcacheError, match=r"layer_03.parquet has 1 rows but the samples hold 9 tokens"):
        import_sources([root])


def test_llama_cpp_missing_line_is_a_gap(tmp_path):
    src = tmp_path / "run.csv"
    llama_csv(src, prompt=2, gen=2, blocks=(0, 1))
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines[:4] + lines[5:]) + "\n")  # token 1 loses its record at block 1
    t, info, _ = roundtrip([src], tmp_path, "--num-experts", "16")
    assert (info["tokens"], info["gap_rows"]) == (4, 1) and t.gap_rows.reshape(4, 2)[1, 1]


def _bad_llama(d):
    p = d / "bad.csv"
    p.write_text("pos,layer,id_1,id_2\n-1,0,1,2\n0,0,3\n")
    return p, "bad.csv, line 3"


def _bad_routed(d):
    r, _ = routed_response("a", 3, 2, 0)
    r["meta_info"]["routed_experts"] = "@@"
    p = d / "resp.jsonl"
    p.write_text(json.dumps(r) + "\n")
    return p, "resp.jsonl, line 1"


def _bad_flame(d):
    root = d / "flame"
    flame_folder(root, iters=(1,))
    pq.write_table(pa.table({"scores": [[0.5] * 6], "indices": [[0, 1, 2, 3, 4, 5]]}),
                   root / "actives" / "iter_0001" / "layer_02.parquet")
    return root, "layer_02.parquet"


def _bad_sglang_ids(d):
    return _bad_sglang(d, lambda data: data["records"][0]["topk_ids_of_layer"].__setitem__((2, 1, 0), 99)), "bad.pt, record 0"


@pytest.mark.parametrize("make", [_bad_llama, _bad_routed, _bad_flame, _bad_sglang_ids])
def test_malformed_input_one_line_error_and_no_output(make, tmp_path):
    src, where = make(tmp_path)
    out = tmp_path / "out.parquet"
    res = run("import", src, out, "--format", detect_format(src), *(["--top-k", "2"] if "resp" in str(src) else []))
    assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
    assert where in res.output
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))


def test_sglang_several_dumps_each_with_its_map_and_one_rank(tmp_path):
    """Two consecutive dumps (the recorder resets after each) continue the same requests; each
    maps its ids with its own last_physical_to_logical_map; rank 1's copy is left out."""
    first, second = tmp_path / "d_1.0_0.pt", tmp_path / "d_2.0_0.pt"
    e1, _ = sglang_dump(first, passes=SG_PASSES[:3], seed=1)
    e2, _ = sglang_dump(second, passes=SG_PASSES[3:], seed=2)
    data = torch.load(second, weights_only=True)
    for r in data["records"]:
        r["forward_pass_id"] += 3
    data["last_physical_to_logical_map"][:, 8] = 6  # rebalanced: physical 8 now holds logical 6
    for r in data["records"]:
        ids = r["topk_ids_of_layer"]
        ids[ids == 8] = 2  # the old replica of logical 2 is gone: use the primary
        ids[ids == 6] = 8  # logical 6 is served by physical 8 now
    assert any((r["topk_ids_of_layer"][1] == 8).any() for r in data["records"])  # the new map matters
    torch.save(data, second)
    other_rank = tmp_path / "d_1.0_1.pt"
    sglang_dump(other_rank, passes=SG_PASSES[:3], seed=1, rank=1)
    t, _ = import_sources([first, second, other_rank])
    assert t.num_requests == 2 and t.num_tokens == 11 and t.metadata["sglang_rank"] == 0
    E = t.token_experts()
    for i, (r, p) in enumerate(zip(t.token_request(), t.token_position())):
        key = ("AB"[r], int(p))
        want = e1.get((key, 0)) or e2[(key, 0)]
        assert E[i, 0].tolist() == want


def test_recorded_schedule_pairs_consecutive_tokens_of_a_request(tmp_path):
    """The Markov learner's input under --batch recorded: each processed token's previous
    processed token of the same request, as the batch schedules give it."""
    src = tmp_path / "d.pt"
    sglang_dump(src)
    t, _ = import_sources([src])
    for prefill in ("skip", "step"):
        rec, b1 = Workload(t, "recorded", prefill).steps, Workload(t, 1, prefill).steps
        np.testing.assert_array_equal(rec.token_prev, b1.token_prev)
        assert sorted(rec.step_tokens.tolist()) == sorted(b1.step_tokens.tolist())
