"""Capture from tiny random MoE models of every supported architecture, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import simcache  # noqa: E402
from simcache.cli import main  # noqa: E402
from simcache import capture as cap  # noqa: E402

from . import tiny_models  # noqa: E402

TEXT = {
    "code": "def f(x):\n    for i in range(3):\n        if x: return i\n" * 12,
    "poetry": "床前明月光 疑是地上霜 举头望明月 低头思故乡 " * 12,
    "prose": "the river and the wind of the moon is that poem " * 12,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    for name, text in TEXT.items():
        (d / f"{name}.txt").write_text(text)
    return d


@pytest.fixture(scope="module", params=tiny_models.ALL)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = tiny_models.build(request.param, folder)
    return request.param, folder, model


class ExpertsTap:
    """What the model's expert modules were given: (indices, weights) per MoE layer."""

    def __init__(self, model, names):
        modules = dict(model.named_modules())
        self.seen = []
        self.handles = []
        for name in names:
            parent = modules[name.rsplit(".", 1)[0]]
            self.handles.append(parent.experts.register_forward_pre_hook(self.hook, with_kwargs=True))

    def hook(self, module, args, kwargs):
        self.seen.append((args[1].detach().clone(), args[2].detach().clone()))

    def close(self):
        for h in self.handles:
            h.remove()


def test_captured_routing_is_what_the_model_routed(tiny, corpus, tmp_path):
    name, folder, _ = tiny
    model, tok, arch = cap.load_model(str(folder))
    docs = cap.read_texts([f"code={corpus / 'code.txt'}", f"poetry={corpus / 'poetry.txt'}"])
    tap = cap.RouterTap(model)
    names = list(tap.names)
    tap.close()
    experts_tap = ExpertsTap(model, names)
    out = tmp_path / "t.parquet"
    stats = cap.capture_text(model, tok, arch, docs, out, max_length=16, batch_size=3)
    experts_tap.close()
    t = simcache.read_trace(out)
    E, k = cap.moe_shape(model, cap.RouterTap(model))
    assert (t.num_layers, t.num_experts, t.top_k) == (len(names), E, k)
    assert t.num_tokens == stats.tokens and t.domains == ("code", "poetry")
    # rebuild, per forward and layer, what the experts got; compare as sets per token
    L = t.num_layers
    calls = [experts_tap.seen[i:i + L] for i in range(0, len(experts_tap.seen), L)]
    ex = t.token_experts()
    w = t.weights.reshape(t.num_tokens, L, k)
    row = 0
    for call in calls:
        for l, (idx, wts) in enumerate(call):
            if name == "switch":
                # one-hot dispatch mask (tokens, 1, E): the chosen expert of each token
                chosen = idx.reshape(-1, idx.shape[-1]).argmax(-1).numpy()[:, None]
                weights = wts.reshape(-1, 1).float().numpy()
            else:
                chosen = idx.reshape(-1, idx.shape[-1]).numpy()
                weights = wts.reshape(-1, wts.shape[-1]).float().numpy()
            n = chosen.shape[0]
            got = ex[row:row + n, l]
            order = np.argsort(-weights, axis=1, kind="stable")
            np.testing.assert_array_equal(got, np.take_along_axis(chosen, order, 1))
            np.testing.assert_allclose(w[row:row + n, l], np.take_along_axis(weights, order, 1), rtol=1e-6)
        row += n
    assert row == t.num_tokens
    # experts are distinct, highest weight first
    assert (np.diff(w, axis=2) <= 1e-7).all()
    assert t.expert_bytes == cap.expert_bytes(model, cap.RouterTap(model)) > 0
    simcache.simulate(t, "lru", 1)


def test_recomputed_from_the_router(tmp_path, corpus):
    """Mixtral routing recomputed independently: softmax, top-2, renormalise."""
    model = tiny_models.build("mixtral", tmp_path / "m", seed=3)
    m, tok, arch = cap.load_model(str(tmp_path / "m"))
    logits = []
    hooks = [mod.register_forward_hook(lambda mod, a, o: logits.append(o[0].detach()))
             for mod in m.modules() if type(mod).__name__.endswith("Router")]
    docs = cap.read_texts([str(corpus / "prose.txt")])
    cap.capture_text(m, tok, arch, docs, tmp_path / "t.parquet", max_length=32, batch_size=1)
    for h in hooks:
        h.remove()
    t = simcache.read_trace(tmp_path / "t.parquet")
    probs = torch.softmax(logits[0].float(), -1)
    top = torch.topk(probs, 2, -1)
    first_seq = t.token_experts()[:32, 0]
    np.testing.assert_array_equal(first_seq, top.indices.numpy())
    np.testing.assert_allclose(t.weights.reshape(-1, 2, 2)[:32, 0], (top.values / top.values.sum(-1, keepdim=True)).numpy(),
                               rtol=1e-5)


def test_generation_mode(tmp_path):
    tiny_models.build("olmoe", tmp_path / "m", seed=1)
    m, tok, arch = cap.load_model(str(tmp_path / "m"))
    stats = cap.capture_generate(m, tok, arch, ["the moon and", "def f"], tmp_path / "g.parquet", new_tokens=5)
    t = simcache.read_trace(tmp_path / "g.parquet")
    assert t.num_requests == 2 and stats.tokens == t.num_tokens
    phases = t.token_phase()
    req = t.token_request()
    for r in (0, 1):
        p = phases[req == r]
        assert p[0] == 0 and (p[-4:] == 1).all() and (np.diff(p) >= 0).all()
        assert (p == 1).sum() == 4  # 5 generated, the last never fed back


def test_cli_capture_and_errors(tmp_path, corpus):
    tiny_models.build("qwen3-moe", tmp_path / "m")
    runner = CliRunner()
    out = tmp_path / "c.parquet"
    r = runner.invoke(main, ["capture", "--model", str(tmp_path / "m"), "--text", f"code={corpus / 'code.txt'}",
                             "--text", str(corpus), "--out", str(out), "--max-length", "24"])
    assert r.exit_code == 0, r.output
    t = simcache.read_trace(out)
    assert set(t.domains) == {"code", t.domains[1]} and "tokens/s" in r.output

    def error(*args):
        res = runner.invoke(main, ["capture", *map(str, args)])
        assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
        return res.output

    assert "exists" in error("--model", tmp_path / "m", "--text", corpus, "--out", out)
    assert "no local weights for mixtral" in error("--model", "mixtral", "--text", corpus, "--out", tmp_path / "x.parquet")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    assert "binary" in error("--model", tmp_path / "m", "--text", tmp_path / "bin.txt", "--out", tmp_path / "y.parquet")
    (tmp_path / "empty.txt").write_text("  \n")
    assert "empty" in error("--model", tmp_path / "m", "--text", tmp_path / "empty.txt", "--out", tmp_path / "y.parquet")
    assert "exceeds the model's context" in error("--model", tmp_path / "m", "--text", corpus, "--max-length", "4096",
                                                  "--out", tmp_path / "y.parquet")
    assert not (tmp_path / "y.parquet").exists() and not (tmp_path / "x.parquet").exists()
    assert "either --text" in error("--model", tmp_path / "m", "--out", tmp_path / "z.parquet")


def test_model_without_router(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **{k: v for k, v in tiny_models.COMMON.items()})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    tiny_models.tiny_tokenizer().save_pretrained(tmp_path / "dense")
    with pytest.raises(simcache.SimcacheError, match="model type 'llama' has no MoE router.*supported: mixtral"):
        cap.load_model(str(tmp_path / "dense"))


def test_interrupted_capture_leaves_no_file(tmp_path, corpus, monkeypatch):
    tiny_models.build("mixtral", tmp_path / "m")
    m, tok, arch = cap.load_model(str(tmp_path / "m"))
    calls = {"n": 0}

    def boom(n):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cap.capture_text(m, tok, arch, cap.read_texts([str(corpus)]), tmp_path / "t.parquet",
                         max_length=8, batch_size=1, progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("name,trace", [("mixtral", "trained-mixtral-8e"), ("olmoe", "trained-olmoe-32e")])
def test_shipped_checkpoints_reproduce_their_traces(name, trace, tmp_path):
    """The shipped checkpoints, run here on the CPU on the token ids a shipped trace records,
    route as the GPU capture did (bf16 on an H200)."""
    from .conftest import ROOT

    t = simcache.read_trace(ROOT / "traces" / f"{trace}.parquet")
    model, tok, arch = cap.load_model(str(ROOT / "models" / name), dtype="bfloat16")
    first = t.select_requests([0, 100, 300])
    tap = cap.RouterTap(model)
    agree = total = 0
    for r in (0, 100, 300):
        rows = first.select_requests([r])
        ids = torch.tensor(rows.token_id[:: rows.num_layers].astype(np.int64))[None]
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        got = np.stack([c[0] for c in tap.take()], axis=1)  # (tokens, L, k)
        want = rows.token_experts()
        agree += (got[:, :, 0] == want[:, :, 0]).sum()
        total += want[:, :, 0].size
    tap.close()
    assert agree / total > 0.95, agree / total
