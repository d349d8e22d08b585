"""Foreign traces: JSONL, other tools' Parquet, the FLAME sample."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import simcache
from simcache.importers import import_file, import_flame

from .conftest import FLAME_RAW, require


def test_jsonl_rows_per_layer(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"seq": 7, "tok": p, "lyr": l, "ids": [(p + l) % 4, (p + l + 1) % 4], "w": [0.6, 0.4], "domain": "code"}
        for p in range(3) for l in range(2)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = import_file(path, request="seq", position="tok", layer="lyr", experts="ids", weights="w", num_experts=4)
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_experts) == (3, 2, 2, 4)
    np.testing.assert_array_equal(t.token_experts()[2, 1], [3, 0])
    assert t.domains == ("code",) and t.weights[0].tolist() == pytest.approx([0.6, 0.4])


def test_jsonl_per_token_lists_and_guessed_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"request": r, "experts": [[r, 3], [2, 3], [0, 3]]} for r in (0, 0, 1)]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    t = import_file(path)
    assert (t.num_tokens, t.num_layers, t.num_experts) == (3, 3, 4)
    assert t.position.tolist()[:6] == [0, 0, 0, 1, 1, 1]


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


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"a": 1}\n', "no experts column"),
        ('not json\n', "not a JSON object per line"),
        ('{"experts": [0, 1]}\n', "no layer column"),
        ('{"experts": [0, 1], "layer": 0}\n{"experts": [0], "layer": 0}\n', "same length"),
        ('\n', "no records"),
    ],
)
def test_jsonl_errors(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(simcache.SimcacheError, match=message):
        import_file(path)


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
