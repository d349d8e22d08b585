"""Capture: the lookahead column on tiny random models of every architecture, --resume after
SIGINT and SIGKILL, --device-map auto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import simcache  # noqa: E402
from simcache import capture as cap  # noqa: E402
from simcache.cli import main  # noqa: E402

from . import tiny_models  # noqa: E402
from .conftest import ROOT  # noqa: E402
from .test_capture import TEXT  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    for name, text in TEXT.items():
        (d / f"{name}.txt").write_text(text)
    return d


class MoEInputs:
    """The input of every MoE block (the router's parent), per forward, independently of the
    capture's own hooks."""

    def __init__(self, model, router_names):
        modules = dict(model.named_modules())
        self.seen = []
        self.handles = [modules[n.rsplit(".", 1)[0]].register_forward_pre_hook(self.hook)
                        for n in router_names]

    def hook(self, module, args):
        x = args[0]
        self.seen.append(x.detach().reshape(-1, x.shape[-1]).clone())

    def close(self):
        for h in self.handles:
            h.remove()


def router_scores(router, x):
    """Router ``router`` applied to ``x`` from its parameters: the score it ranks experts by."""
    x = x.float()
    if hasattr(router, "classifier"):  # Switch
        logits = torch.nn.functional.linear(x, router.classifier.weight.float(),
                                            None if router.classifier.bias is None else router.classifier.bias.float())
    else:
        bias = getattr(router, "bias", None)
        logits = torch.nn.functional.linear(x, router.weight.float(), None if bias is None else bias.float())
    corr = getattr(router, "e_score_correction_bias", None)
    return logits.sigmoid() + corr.float() if corr is not None else torch.softmax(logits, -1)


@pytest.mark.parametrize("name", tiny_models.ALL)
def test_lookahead_is_router_l_plus_1_on_layer_l_input(name, tmp_path, corpus):
    tiny_models.build(name, tmp_path / "m", seed=5)
    model, tok, arch = cap.load_model(str(tmp_path / "m"))
    tap = cap.RouterTap(model)
    names, routers = list(tap.names), list(tap.routers)
    tap.close()
    inputs = MoEInputs(model, names)
    out = tmp_path / "t.parquet"
    cap.capture_text(model, tok, arch, cap.read_texts([str(corpus / "code.txt")]), out, max_length=12,
                     batch_size=2, lookahead=True)
    inputs.close()
    t = simcache.read_trace(out)
    L, k, E = t.num_layers, t.top_k, t.num_experts
    w = min(2 * k, E)
    assert t.lookahead.shape == (t.num_rows, w) and "router l+1" in t.metadata["lookahead"]
    la = t.lookahead.reshape(t.num_tokens, L, w)
    ls = t.lookahead_scores.reshape(t.num_tokens, L, w)
    assert (la[:, L - 1] == -1).all()
    row = 0
    for f in range(0, len(inputs.seen), L):
        xs = inputs.seen[f:f + L]
        n = xs[0].shape[0]
        for l in range(L - 1):
            with torch.no_grad():
                scores = router_scores(routers[l + 1], xs[l])
            top = torch.topk(scores, w, dim=-1)
            np.testing.assert_array_equal(la[row:row + n, l], top.indices.numpy(), err_msg=f"layer {l}")
            np.testing.assert_allclose(ls[row:row + n, l], top.values.numpy(), rtol=1e-5, atol=1e-6)
        row += n
    assert row == t.num_tokens
    # the lookahead column leaves the routing itself as a plain capture records it
    plain = tmp_path / "p.parquet"
    cap.capture_text(model, tok, arch, cap.read_texts([str(corpus / "code.txt")]), plain, max_length=12, batch_size=2)
    np.testing.assert_array_equal(simcache.read_trace(plain).experts, t.experts)


def test_lookahead_in_generation_mode(tmp_path):
    tiny_models.build("olmoe", tmp_path / "m", seed=2)
    m, tok, arch = cap.load_model(str(tmp_path / "m"))
    cap.capture_generate(m, tok, arch, ["the moon", "def f"], tmp_path / "g.parquet", new_tokens=4, lookahead=True)
    t = simcache.read_trace(tmp_path / "g.parquet")
    assert t.lookahead is not None and (t.lookahead.reshape(t.num_tokens, t.num_layers, -1)[:, :-1] >= 0).all()


def equal_traces(a, b):
    for f in ("request", "position", "phase", "layer", "experts", "weights", "token_id", "domain",
              "lookahead", "lookahead_scores"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=f)
    assert a.domains == b.domains
    assert a.metadata == b.metadata


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    for name, text in TEXT.items():
        (d / f"{name}.txt").write_text(text * 4)
    return d


@pytest.fixture(scope="module")
def resume_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral")
    tiny_models.build("mixtral", folder, seed=7)
    return folder


CAPTURE_ARGS = ["--max-length", "8", "--batch-size", "2", "--lookahead", "--row-group-rows", "64"]


@pytest.fixture(scope="module")
def uninterrupted(resume_model, big_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.parquet"
    res = CliRunner().invoke(main, ["capture", "--model", str(resume_model), "--text", str(big_corpus),
                                    "--out", str(out), *CAPTURE_ARGS])
    assert res.exit_code == 0, res.output
    return simcache.read_trace(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_resume_after_a_signal_equals_an_uninterrupted_capture(sig, resume_model, big_corpus, uninterrupted, tmp_path):
    out = tmp_path / "t.parquet"
    partial = tmp_path / "t.parquet.partial"
    cmd = [sys.executable, "-m", "simcache", "capture", "--model", str(resume_model), "--text", str(big_corpus),
           "--out", str(out), *CAPTURE_ARGS, "--resume"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(partial.glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "the capture finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    parts = sorted(partial.glob("part-*.parquet"))
    assert len(parts) >= 3
    done = simcache.read_trace(parts[-1]).metadata["capture_progress"]
    assert 0 < done["tokens"] < uninterrupted.num_tokens
    res = CliRunner().invoke(main, ["capture", "--model", str(resume_model), "--text", str(big_corpus),
                                    "--out", str(out), *CAPTURE_ARGS, "--resume"])
    assert res.exit_code == 0, res.output
    assert not partial.exists()
    equal_traces(simcache.read_trace(out), uninterrupted)


def test_resume_refuses_other_settings_and_plain_runs_see_the_partial(resume_model, corpus, tmp_path):
    m, tok, arch = cap.load_model(str(resume_model))
    docs = cap.read_texts([str(corpus / "code.txt")])
    out = tmp_path / "t.parquet"
    calls = {"n": 0}

    def stop(n):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cap.capture_text(m, tok, arch, docs, out, max_length=8, batch_size=1, resume=True, group_rows=48, progress=stop)
    assert (tmp_path / "t.parquet.partial").is_dir() and not out.exists()
    with pytest.raises(simcache.SimcacheError, match="holds a capture with other settings"):
        cap.capture_text(m, tok, arch, docs, out, max_length=9, batch_size=1, resume=True, group_rows=48)
    with pytest.raises(simcache.SimcacheError, match="continue it with --resume"):
        cap.capture_text(m, tok, arch, docs, out, max_length=8, batch_size=1)
    stats = cap.capture_text(m, tok, arch, docs, out, max_length=8, batch_size=1, resume=True, group_rows=48)
    ref = tmp_path / "ref.parquet"
    cap.capture_text(m, tok, arch, docs, ref, max_length=8, batch_size=1)
    equal_traces(simcache.read_trace(out), simcache.read_trace(ref))
    assert stats.tokens == simcache.read_trace(ref).num_tokens


def test_device_map_auto_equals_a_plain_load(tmp_path, corpus):
    pytest.importorskip("accelerate")
    tiny_models.build("qwen2-moe", tmp_path / "m", seed=4)
    docs = cap.read_texts([str(corpus / "prose.txt")])
    traces = []
    for device_map in (None, "auto"):
        m, tok, arch = cap.load_model(str(tmp_path / "m"), device_map=device_map)
        assert {p.device.type for p in m.parameters()} == {"cpu"}  # no GPU here: all on the CPU
        out = tmp_path / f"{device_map}.parquet"
        cap.capture_text(m, tok, arch, docs, out, max_length=16, batch_size=2)
        traces.append(simcache.read_trace(out))
    equal_traces(*traces)
