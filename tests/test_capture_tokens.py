"""Capture from token-id sequences (capture_tokens), and the shipped look-ahead trace: its
lookahead column is router l+1 on layer l's MoE input of the shipped checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import simcache  # noqa: E402
from simcache import capture as cap  # noqa: E402
from simcache.errors import SimcacheError  # noqa: E402

from . import tiny_models  # noqa: E402
from .conftest import ROOT  # noqa: E402
from .test_capture_resume import MoEInputs, corpus, router_scores  # noqa: E402,F401

COLUMNS = ("request", "position", "phase", "layer", "experts", "weights", "token_id", "lookahead",
           "lookahead_scores")


def sequences_of(trace):
    """(domain label, token ids) per request, as a trace records them."""
    first = trace.layer == 0
    out = []
    for r in np.unique(trace.request):
        rows = first & (trace.request == r)
        out.append((trace.domains[trace.domain[rows][0]], trace.token_id[rows][np.argsort(trace.position[rows])]))
    return out


def test_token_sequences_capture_as_the_text_they_came_from(tmp_path, corpus):
    tiny_models.build("mixtral", tmp_path / "m", seed=3)
    model, tok, arch = cap.load_model(str(tmp_path / "m"))
    docs = cap.read_texts([str(corpus / "code.txt"), str(corpus / "prose.txt")])
    cap.capture_text(model, tok, arch, docs, tmp_path / "a.parquet", max_length=10, batch_size=3, lookahead=True)
    a = simcache.read_trace(tmp_path / "a.parquet")
    assert a.num_requests > 3 and len(set(np.bincount(a.request))) > 1  # batches and a short tail
    cap.capture_tokens(model, arch, sequences_of(a), tmp_path / "b.parquet", batch_size=3, lookahead=True)
    b = simcache.read_trace(tmp_path / "b.parquet")
    for col in COLUMNS:
        np.testing.assert_array_equal(getattr(b, col), getattr(a, col), err_msg=col)
    assert [b.domains[d] for d in b.domain] == [a.domains[d] for d in a.domain]
    assert "given token sequences" in b.metadata["capture"]


def test_token_sequences_bad_input(tmp_path):
    tiny_models.build("olmoe", tmp_path / "m", seed=1)
    model, _, arch = cap.load_model(str(tmp_path / "m"))
    vocab = model.get_input_embeddings().weight.shape[0]
    for seqs, msg in [([("x", [1])], "at least 2"), ([("x", [1, vocab])], "outside the vocabulary"),
                      ([("x", [1, -1])], "outside the vocabulary"),
                      ([("x", [1] * 10_000)], "exceeds the model's context"), ([], "no sequence")]:
        with pytest.raises(SimcacheError, match=msg):
            cap.capture_tokens(model, arch, seqs, tmp_path / "t.parquet")
    with pytest.raises(SimcacheError, match="prompt-tokens"):
        cap.capture_tokens(model, arch, [("x", [1, 2, 3])], tmp_path / "t.parquet", prompt_tokens=3)
    assert not (tmp_path / "t.parquet").exists()


SHIPPED = ROOT / "traces" / "trained-mixtral-8e-lookahead.parquet"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped look-ahead trace")
def test_shipped_lookahead_trace_is_router_l_plus_1_on_layer_l_input():
    """For the first 64 tokens of three requests, the shipped checkpoint run here (bf16, as the
    trace was made) applied router l+1 to layer l's MoE input gives the stored top-2k: the
    stored ids are a top-2k of the recomputed scores within bf16 rounding, and equal them
    exactly for nearly every token; the routing columns equal the trace it was made from
    wherever the top-k does."""
    t = simcache.read_trace(SHIPPED)
    orig = simcache.read_trace(ROOT / "traces" / "trained-mixtral-8e.parquet")
    assert t.lookahead.dtype == np.int16 and t.lookahead.shape[1] == 2 * t.top_k
    for col in ("request", "position", "layer", "token_id"):
        np.testing.assert_array_equal(getattr(t, col), getattr(orig, col), err_msg=col)
    same = (np.sort(t.experts, axis=1) == np.sort(orig.experts, axis=1)).all(axis=1)
    assert same.mean() > 0.97, same.mean()

    model, _, arch = cap.load_model(str(ROOT / "models" / "mixtral"), dtype="bfloat16")
    tap = cap.RouterTap(model)
    names, routers = list(tap.names), list(tap.routers)
    tap.close()
    L, w, n = t.num_layers, t.lookahead.shape[1], 64
    exact = total = 0
    for r in (0, 200, 496):
        rows = t.select_requests([r])
        ids = torch.tensor(rows.token_id[::L][:n].astype(np.int64))[None]
        inputs = MoEInputs(model, names)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        inputs.close()
        la = rows.lookahead.reshape(-1, L, w)[:n]
        ls = rows.lookahead_scores.reshape(-1, L, w)[:n]
        assert (la[:, L - 1] == -1).all()
        for l in range(L - 1):
            with torch.no_grad():
                scores = router_scores(routers[l + 1], inputs.seen[l]).numpy()  # (n, E)
            best = -np.sort(-scores, axis=1)[:, :w]
            stored = np.take_along_axis(scores, la[:, l].astype(np.int64), axis=1)
            np.testing.assert_allclose(stored, best, atol=0.02, err_msg=f"request {r} layer {l}")
            np.testing.assert_allclose(ls[:, l], best, rtol=0.02, atol=0.01, err_msg=f"request {r} layer {l}")
            exact += (la[:, l] == np.argsort(-scores, axis=1, kind="stable")[:, :w]).all(axis=1).sum()
            total += n
        # the routing of these tokens: as the shipped trace has it, wherever the top-k matched
        got, want = rows.experts.reshape(-1, L, t.top_k)[:n], orig.select_requests([r]).experts.reshape(-1, L, t.top_k)[:n]
        assert (np.sort(got, axis=2) == np.sort(want, axis=2)).all(axis=2).mean() > 0.95
    assert exact / total > 0.9, exact / total
