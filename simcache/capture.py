"""Capture routing traces from Hugging Face MoE models (docs/design.md §7).

A forward hook on every router module records, per token and MoE layer, the experts the router
chose and the weights the model applies to them — the router's own outputs, so the trace is
exactly what the model routed. Transformers 5 (tested: 5.24) gives every supported architecture
a router module (``*Router``) beside an ``experts`` module; the registry below names them and
says how each picks its top-k.

Two modes: teacher-forced over text (routing of token t depends only on tokens <= t, so this
equals what decoding that text would route, and it is fast) and generation from prompts. Rows
stream to the file in row groups through :class:`~simcache.trace.TraceWriter`, so memory stays
bounded and an interrupted capture leaves no file behind. With ``resume=True`` every completed
row group is kept as its own small trace in ``OUT.partial/``; a capture killed at any point
(SIGINT, SIGKILL) continues, when run again with ``resume=True``, after its last complete row
group, and the joined result equals an uninterrupted capture.

``lookahead=True`` records, per token and MoE layer l < L-1, the top-2k experts and scores that
router l+1 gives when applied to layer l's MoE input (the tensor router l was given), the
input a prefetcher has in hand one layer early (docs/design.md §12).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from simcache.errors import SimcacheError
from simcache._files import check_input
from simcache.trace import NO_EXPERT, ROW_GROUP_ROWS, TraceWriter, read_trace


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    selection: str  # how the router picks its top-k, as implemented by transformers
    seq2seq: bool = False


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("mixtral", ("mixtral",), "softmax over experts, top-k, renormalised to sum 1"),
        Architecture("qwen2-moe", ("qwen2_moe",), "softmax, top-k, renormalised iff norm_topk_prob"),
        Architecture("qwen3-moe", ("qwen3_moe",), "softmax, top-k, renormalised iff norm_topk_prob"),
        Architecture("olmoe", ("olmoe",), "softmax, top-k, renormalised iff norm_topk_prob"),
        Architecture("deepseek-v2", ("deepseek_v2",),
                     "softmax; greedy or group-limited greedy top-k; x routed_scaling_factor"),
        Architecture("deepseek-v3", ("deepseek_v3",),
                     "sigmoid + correction bias; groups by top-2 sum; top-k; renormalised; x scaling"),
        Architecture("gpt-oss", ("gpt_oss",), "top-k of the logits, softmax over those k"),
        Architecture("phimoe", ("phimoe",), "sparsemixer top-2"),
        Architecture("switch", ("switch_transformers",),
                     "softmax, top-1 (tokens over an expert's capacity are recorded but not computed)",
                     seq2seq=True),
    )
}

ALIASES = {
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "qwen-moe": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen2-moe": "Qwen/Qwen2-57B-A14B",
    "qwen3-moe": "Qwen/Qwen3-30B-A3B",
    "olmoe": "allenai/OLMoE-1B-7B-0924",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "phimoe": "microsoft/Phi-3.5-MoE-instruct",
    "switch-base-128": "google/switch-base-128",
}


def architecture_of(model_type: str) -> Architecture:
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    names = ", ".join(ARCHITECTURES)
    raise SimcacheError(f"model type '{model_type}' has no MoE router simcache knows (supported: {names})")


# ---- loading ------------------------------------------------------------------------------


def load_model(name: str, device: str = "cpu", dtype: str | None = None, device_map: str | None = None):
    """(model, tokenizer, architecture) for a local path, an alias or a hub name that is in
    the local cache. Nothing is downloaded.

    ``device_map="auto"`` lets accelerate spread a model too large for one GPU over every
    visible GPU (then CPU memory); ``device`` is then ignored.
    """
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = Path(name)
    source = str(path) if path.exists() else ALIASES.get(name, name)
    local_only = not path.exists()
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if path.exists():
            raise SimcacheError(f"{path} holds no readable model config ({str(exc).splitlines()[0]})") from None
        alias = f" ('{name}' = {source})" if name in ALIASES else ""
        raise SimcacheError(
            f"no local weights for {name}{alias}: no model hub is reachable here; download the "
            f"checkpoint where one is and pass --model /path/to/checkpoint, or point HF_HOME at a "
            f"cache that holds it"
        ) from None
    arch = architecture_of(getattr(config, "model_type", "?"))
    extra = {}
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise SimcacheError("--device-map needs accelerate: pip install 'simcache[capture]'") from None
        extra["device_map"] = device_map
        gpus = torch.cuda.device_count()
        device = "cuda" if gpus else "cpu"
    torch_dtype = _dtype(dtype, device)
    auto = transformers.AutoModelForSeq2SeqLM if arch.seq2seq else transformers.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(source, local_files_only=local_only, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        raise SimcacheError(f"cannot load {source}: {str(exc).splitlines()[0]}") from None
    tokenizer = _tokenizer(transformers, source, local_only)
    if device_map is None:
        try:
            model.to(torch.device(device))
        except (RuntimeError, AssertionError) as exc:
            raise SimcacheError(f"cannot use device '{device}': {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer, arch


def _tokenizer(transformers, source, local_only):
    """The checkpoint's tokenizer. Without one, transformers falls through to converters
    (sentencepiece, tiktoken) that fail in many ways: each becomes one line here."""
    try:
        return transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, ImportError, TypeError, ... by converter
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise SimcacheError(f"{source} has no usable tokenizer (save one beside the weights): "
                            f"{reason[:160]}") from None


def _dtype(dtype: str | None, device: str):
    import torch

    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SimcacheError(f"dtype must be one of {', '.join(table)}, got {dtype!r}")
    return table[dtype]


# ---- the router tap -------------------------------------------------------------------------


class RouterTap:
    """Forward hooks on every router of a model, in module order (= MoE layer order; for
    Switch, encoder layers then decoder layers).

    After a forward pass, :meth:`take` returns experts and weights per MoE layer, each of
    shape (tokens, k), highest gate first, tokens in batch-major order. With ``lookahead``
    (a width w), :meth:`take_lookahead` returns per layer l < L-1 the top-w experts and scores
    of router l+1 applied to router l's input (see :func:`lookahead_scores`).
    """

    def __init__(self, model, lookahead: int = 0):
        self.names = []
        self.routers = []
        for name, module in model.named_modules():
            if type(module).__name__.endswith("Router"):
                self.names.append(name)
                self.routers.append(module)
        if not self.routers:
            raise SimcacheError(
                f"{type(model).__name__} has no MoE router module (supported: {', '.join(ARCHITECTURES)})"
            )
        self._out: list = [None] * len(self.routers)
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]
        self.lookahead = int(lookahead)
        self._inputs: list = [None] * len(self.routers)
        self._busy = False  # while router l+1 runs on layer l's input: record nothing
        if self.lookahead:
            self._handles += [r.register_forward_pre_hook(self._pre_hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i):
        def hook(module, args, output):
            if not self._busy:
                self._out[i] = _router_choice(output)

        return hook

    def _pre_hook(self, i):
        def hook(module, args):
            if not self._busy:
                self._inputs[i] = args[0].detach()

        return hook

    def take_lookahead(self):
        """(experts int16 (tokens, w), scores float32 (tokens, w)) per layer l < L-1."""
        import torch

        out = []
        self._busy = True
        try:
            with torch.inference_mode():
                for l in range(len(self.routers) - 1):
                    x = self._inputs[l]
                    nxt = self.routers[l + 1]
                    x = x.to(next(iter(nxt.parameters())).device)
                    scores = lookahead_scores(nxt, nxt(x))
                    top = torch.topk(scores, self.lookahead, dim=-1)
                    out.append((top.indices.to("cpu", torch.int16).numpy(), top.values.float().cpu().numpy()))
        finally:
            self._busy = False
            self._inputs = [None] * len(self.routers)
        return out

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def take(self):
        if any(o is None for o in self._out):
            missing = [self.names[i] for i, o in enumerate(self._out) if o is None]
            raise SimcacheError(f"routers did not run: {', '.join(missing)}")
        out, self._out = self._out, [None] * len(self.routers)
        return out

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def lookahead_scores(router, output):
    """The score a router ranks every expert by, from its own output: softmax of its logits
    (all supported routers but two), ``sigmoid(logits) + e_score_correction_bias`` for
    DeepSeek-V3's, and for Switch the softmax of the logits it returns last. Group limits
    (DeepSeek) are not applied: these are scores over all experts, (tokens, E)."""
    import torch

    logits = output[2] if type(router).__name__.startswith("SwitchTransformers") else output[0]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is not None:
        return logits.sigmoid() + bias.float()
    return torch.softmax(logits, dim=-1)


LOOKAHEAD_NOTE = ("per token and MoE layer l < L-1: top-2k experts by the score router l+1 gives "
                  "when applied to the input of router l (layer l's MoE input, the hidden states "
                  "after its post-attention norm); scores = softmax of router l+1's logits "
                  "(DeepSeek-V3: sigmoid + correction bias), over all experts, no group limit; "
                  "-1 at the last layer")


def _router_choice(output):
    """(experts, weights) as int16 / float32 numpy (tokens, k), highest weight first."""
    import torch

    a, b, c = output[0], output[1], output[2]
    if a.dtype.is_floating_point and c.dtype in (torch.int64, torch.int32):
        weights, experts = b, c  # (logits, weights, indices): the TopK routers
    else:  # Switch: (one-hot dispatch mask, top-1 probability, logits)
        experts = c.argmax(dim=-1, keepdim=True)
        weights = b
    experts = experts.reshape(-1, experts.shape[-1])
    weights = weights.reshape(-1, weights.shape[-1]).float()
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
    experts = torch.gather(experts, 1, order)
    weights = torch.gather(weights, 1, order)
    return experts.to("cpu", torch.int16).numpy(), weights.cpu().numpy()


def expert_bytes(model, tap: RouterTap) -> int:
    """Bytes of one expert's weights, from the model's own expert parameters and dtype."""
    root = dict(model.named_modules())
    name = tap.names[0]
    parent = root[name.rsplit(".", 1)[0]] if "." in name else model
    experts = getattr(parent, "experts", None)
    if experts is None:
        raise SimcacheError(f"no experts module beside router {name}")
    total = sum(p.numel() * p.element_size() for p in experts.parameters())
    n = getattr(tap.routers[0], "num_experts", None)
    if n is None:
        n = len(experts)
    return int(total // n)


def moe_shape(model, tap: RouterTap) -> tuple[int, int]:
    """(num_experts, top_k) from the model config."""
    cfg = model.config
    E = next(getattr(cfg, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
             if getattr(cfg, a, None))
    k = 1 if getattr(cfg, "model_type", "") == "switch_transformers" else cfg.num_experts_per_tok
    return int(E), int(k)


def context_length(model) -> int | None:
    cfg = model.config
    for a in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(cfg, a, None):
            return int(getattr(cfg, a))
    return None


# ---- inputs ---------------------------------------------------------------------------------


def read_texts(specs: Iterable[str]) -> list[tuple[str, str, str]]:
    """``[LABEL=]PATH`` specs -> (label, file, text) documents. A folder contributes every text
    file under it (binary files are skipped); a file given by name must be text."""
    docs = []
    for spec in specs:
        label, _, path_text = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(path_text)
        if not path.exists():
            raise SimcacheError(f"text path not found: {path}")
        if not path.is_dir():
            check_input(path, "text file")
        label = label or (path.stem if path.is_file() else path.name)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        found = 0
        for f in files:
            text = _read_text(f, strict=not path.is_dir())
            if text is None:
                continue
            if not text.strip():
                if not path.is_dir():
                    raise SimcacheError(f"{f} is empty")
                continue
            docs.append((label, str(f), text))
            found += 1
        if not found:
            raise SimcacheError(f"{path} holds no text")
    return docs


def _read_text(path: Path, strict: bool) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        if strict:
            raise SimcacheError(f"{path} is binary, not text")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            raise SimcacheError(f"{path} is not UTF-8 text") from None
        return None


# ---- capture --------------------------------------------------------------------------------


@dataclass
class CaptureStats:
    tokens: int
    requests: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


class _Sink:
    """Where a capture's rows go: straight into the trace (a :class:`TraceWriter`), or, when
    resumable, into ``OUT.partial/part-NNNNN.parquet``, one small trace per completed row
    group of at least ``group_rows`` rows, each written atomically and stamped with how many
    *units* (teacher-forced batches, or prompts) it completes. :meth:`close` joins the parts
    into ``OUT`` and removes the folder.
    """

    def __init__(self, out, meta, *, overwrite, resume, group_rows, key):
        self.out = Path(out)
        self.meta = meta
        self.resume = resume
        self.group_rows = int(group_rows)
        self.units_done = self.requests = self.tokens = 0
        self.parts = 0
        self._pending: list[dict] = []
        self._rows = 0
        if not resume:
            partial = Path(str(self.out) + ".partial")
            if partial.exists():
                raise SimcacheError(f"an interrupted capture is kept in {partial}: continue it with "
                                    f"--resume, or remove that folder")
            self.writer = TraceWriter(out, overwrite=overwrite, **meta)
            self.writer.__enter__()
            return
        from simcache._files import check_output

        check_output(self.out, overwrite)
        self.dir = Path(str(self.out) + ".partial")
        state = {"key": key}
        if self.dir.exists():
            try:
                found = json.loads((self.dir / "state.json").read_text())
            except (OSError, ValueError):
                raise SimcacheError(f"{self.dir} is not a capture in progress (no readable state.json); "
                                    f"remove it") from None
            if found.get("key") != key:
                raise SimcacheError(f"{self.dir} holds a capture with other settings (model, text, "
                                    f"lengths, batch size or lookahead differ); remove it to start over")
            for tmp in self.dir.glob(".*.tmp"):  # a part cut off mid-write
                tmp.unlink()
            parts = sorted(self.dir.glob("part-*.parquet"))
            self.parts = len(parts)
            if parts:
                progress = read_trace(parts[-1]).metadata["capture_progress"]
                self.units_done = int(progress["units"])
                self.requests = int(progress["requests"])
                self.tokens = int(progress["tokens"])
        else:
            self.dir.mkdir()
            from simcache._files import atomic_write_text

            atomic_write_text(self.dir / "state.json", json.dumps(state))

    def write(self, **columns):
        if not self.resume:
            self.writer.write(**columns)
            return
        self._pending.append(columns)
        self._rows += len(columns["request"])

    def unit_done(self, requests: int, tokens: int):
        """One unit finished, bringing the totals to ``requests`` and ``tokens``."""
        self.units_done += 1
        self.requests, self.tokens = requests, tokens
        if self.resume and self._rows >= self.group_rows:
            self._flush()

    def _flush(self):
        if not self._pending:
            return
        path = self.dir / f"part-{self.parts:05d}.parquet"
        progress = {"units": self.units_done, "requests": self.requests, "tokens": self.tokens}
        with TraceWriter(path, **self.meta, capture_progress=progress) as w:
            for cols in self._pending:
                w.write(**cols)
        self.parts += 1
        self._pending, self._rows = [], 0

    def close(self):
        if not self.resume:
            self.writer.__exit__(None, None, None)
            return
        self._flush()
        parts = sorted(self.dir.glob("part-*.parquet"))
        if not parts:
            raise SimcacheError("nothing was written: the trace would be empty")
        with TraceWriter(self.out, overwrite=True, **self.meta) as w:
            for part in parts:
                t = read_trace(part)
                names = np.array(list(t.domains) + [None], dtype=object)
                w.write(request=t.request, position=t.position, phase=t.phase, layer=t.layer,
                        experts=t.experts, weights=t.weights, token_id=t.token_id,
                        domain=None if t.domain is None else names[np.where(t.domain < 0, len(t.domains), t.domain)],
                        lookahead=t.lookahead, lookahead_scores=t.lookahead_scores)
        shutil.rmtree(self.dir)

    def abort(self):
        """An error or interrupt: a plain capture leaves nothing; a resumable one keeps its
        completed parts (rows after the last part are dropped, and captured again)."""
        if not self.resume:
            self.writer.__exit__(KeyboardInterrupt, None, None)
        else:
            self._pending = []
            if self.parts == 0 and self.dir.exists():
                shutil.rmtree(self.dir)


def _key(meta, inputs, settings) -> str:
    """What must match for a capture to resume: model, inputs and settings."""
    h = hashlib.sha256()
    stable = {k: v for k, v in meta.items() if k not in ("torch_version", "tool_version")}
    h.update(json.dumps([stable, settings], sort_keys=True, default=str).encode())
    for item in inputs:
        h.update(hashlib.sha256(str(item).encode()).digest())
    return h.hexdigest()


def _lookahead_rows(tap, n_tokens, L, width):
    """(experts int16 (n*L, w), scores float32 (n*L, w)) in token-major, layer-minor order."""
    la = np.full((n_tokens, L, width), NO_EXPERT, np.int16)
    ls = np.zeros((n_tokens, L, width), np.float32)
    for l, (ids, scores) in enumerate(tap.take_lookahead()):
        la[:, l] = ids
        ls[:, l] = scores
    return la.reshape(-1, width), ls.reshape(-1, width)


def _chunks(docs, tokenizer, max_length) -> Iterator[tuple[str, list[int]]]:
    for label, _, text in docs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for lo in range(0, len(ids), max_length):
            piece = ids[lo: lo + max_length]
            if len(piece) >= 2:
                yield label, piece


def _metadata(model, tap, arch, name, mode, corpus):
    E, k = moe_shape(model, tap)
    import torch

    return dict(
        model=str(name),
        architecture=arch.name,
        model_type=model.config.model_type,
        num_layers=tap.num_layers,
        num_experts=E,
        top_k=k,
        expert_bytes=expert_bytes(model, tap),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        capture=mode,
        corpus=corpus,
        router_selection=arch.selection,
        router_modules=tap.names,
        torch_version=torch.__version__,
    )


def capture_text(model, tokenizer, arch, docs, out, *, name="model", max_length=512, batch_size=8,
                 prompt_tokens=0, overwrite=False, progress: Callable[[int], None] | None = None,
                 resume=False, lookahead=False, group_rows=None) -> CaptureStats:
    """Teacher-forced capture over ``docs`` (from :func:`read_texts`) into ``out``.

    Every document is tokenized and cut into sequences of ``max_length`` tokens (each one a
    request); sequences of equal length run ``batch_size`` at a time. The first
    ``prompt_tokens`` of each sequence are marked prefill (phase 0), the rest decode.
    ``resume`` keeps completed row groups of ``group_rows`` rows (default: the trace's row
    group) in ``out.partial/`` and continues from them (see the module docstring);
    ``lookahead`` adds the lookahead column. ``CaptureStats`` counts the whole trace.
    """
    ctx = context_length(model)
    if max_length < 2:
        raise SimcacheError(f"max-length must be at least 2, got {max_length}")
    if ctx is not None and max_length > ctx:
        raise SimcacheError(f"max-length {max_length} exceeds the model's context of {ctx} tokens")
    if not 0 <= prompt_tokens < max_length:
        raise SimcacheError(f"prompt-tokens must be in [0, max-length={max_length}), got {prompt_tokens}")
    corpus = sorted({f"{label}: {path}" for label, path, _ in docs})
    return _teacher_forced(model, arch, _chunks(docs, tokenizer, max_length), out, name=name,
                           mode=f"teacher-forced, sequences of {max_length} tokens", corpus=corpus,
                           key_inputs=[(label, text) for label, _, text in docs],
                           settings=dict(max_length=max_length), batch_size=batch_size,
                           prompt_tokens=prompt_tokens, overwrite=overwrite, progress=progress,
                           resume=resume, lookahead=lookahead, group_rows=group_rows)


def capture_tokens(model, arch, sequences, out, *, name="model", corpus=("token sequences",), batch_size=8,
                   prompt_tokens=0, overwrite=False, progress: Callable[[int], None] | None = None,
                   resume=False, lookahead=False, group_rows=None) -> CaptureStats:
    """Teacher-forced capture over given token-id sequences: ``sequences`` is a list of
    (label, ids), each one request, as :func:`capture_text` makes from text (same batching,
    phases, ``resume`` and ``lookahead``); for re-capturing a trace from its ``token_id``."""
    ctx = context_length(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    seqs = []
    for i, (label, ids) in enumerate(sequences):
        ids = [int(x) for x in ids]
        if len(ids) < 2:
            raise SimcacheError(f"token sequence {i} has {len(ids)} tokens; at least 2 are needed")
        if ctx is not None and len(ids) > ctx:
            raise SimcacheError(f"token sequence {i} ({len(ids)} tokens) exceeds the model's context of {ctx}")
        if min(ids) < 0 or max(ids) >= vocab:
            raise SimcacheError(f"token sequence {i} holds an id outside the vocabulary 0..{vocab - 1}")
        seqs.append((label, ids))
    longest = max((len(s) for _, s in seqs), default=0)
    if prompt_tokens < 0 or (seqs and prompt_tokens >= longest):
        raise SimcacheError(f"prompt-tokens must be in [0, longest sequence={longest}), got {prompt_tokens}")
    return _teacher_forced(model, arch, seqs, out, name=name,
                           mode=f"teacher-forced, given token sequences (up to {longest} tokens)",
                           corpus=list(corpus), key_inputs=seqs, settings={}, batch_size=batch_size,
                           prompt_tokens=prompt_tokens, overwrite=overwrite, progress=progress,
                           resume=resume, lookahead=lookahead, group_rows=group_rows)


def _teacher_forced(model, arch, pieces, out, *, name, mode, corpus, key_inputs, settings, batch_size,
                    prompt_tokens, overwrite, progress, resume, lookahead, group_rows) -> CaptureStats:
    """The teacher-forced loop: (label, ids) pieces, equal lengths batched, into ``out``."""
    import torch

    if batch_size < 1:
        raise SimcacheError(f"batch-size must be positive, got {batch_size}")
    device = model.get_input_embeddings().weight.device
    tap = RouterTap(model)
    meta = _metadata(model, tap, arch, name, mode, corpus)
    k = meta["top_k"]
    L = tap.num_layers
    width = min(2 * k, meta["num_experts"]) if lookahead else 0
    if lookahead:
        tap.close()
        tap = RouterTap(model, lookahead=width)
        meta["lookahead"] = LOOKAHEAD_NOTE
    settings = dict(settings, batch_size=batch_size, prompt_tokens=prompt_tokens, lookahead=width)
    key = _key(meta, key_inputs, settings)
    start = time.perf_counter()
    try:
        writer = _Sink(out, meta, overwrite=overwrite, resume=resume,
                       group_rows=group_rows or ROW_GROUP_ROWS, key=key)
    except BaseException:
        tap.close()
        raise
    requests, tokens = writer.requests, writer.tokens
    skip = writer.units_done
    try:
        try:
            pending: dict[int, list] = {}

            def run(batch):
                nonlocal requests, tokens, skip
                if skip:  # completed before an interruption: in the parts already
                    skip -= 1
                    return
                n, s = len(batch), len(batch[0][1])
                ids = torch.tensor([b[1] for b in batch], device=device)
                with torch.inference_mode():
                    if arch.seq2seq:
                        model(input_ids=ids, decoder_input_ids=_shift_right(model, ids))
                    else:
                        model(input_ids=ids, use_cache=False)
                choices = tap.take()
                experts = np.stack([c[0] for c in choices], axis=1)  # (n*s, L, k)
                weights = np.stack([c[1] for c in choices], axis=1)
                la = ls = None
                if width:
                    la, ls = _lookahead_rows(tap, n * s, L, width)
                req = np.repeat(np.arange(requests, requests + n, dtype=np.int32), s * L)
                pos = np.tile(np.repeat(np.arange(s, dtype=np.int32), L), n)
                writer.write(
                    request=req, position=pos,
                    phase=(pos >= prompt_tokens).astype(np.int8),
                    layer=np.tile(np.arange(L, dtype=np.int16), n * s),
                    experts=experts.reshape(-1, k), weights=weights.reshape(-1, k),
                    token_id=np.repeat(ids.cpu().numpy().reshape(-1), L),
                    domain=np.repeat(np.array([b[0] for b in batch], dtype=object), s * L),
                    lookahead=la, lookahead_scores=ls,
                )
                requests += n
                tokens += n * s
                writer.unit_done(requests, tokens)
                if progress is not None:
                    progress(n * s)

            for label, piece in pieces:
                group = pending.setdefault(len(piece), [])
                group.append((label, piece))
                if len(group) == batch_size:
                    run(group)
                    pending[len(piece)] = []
            for group in pending.values():
                if group:
                    run(group)
            if requests == 0:
                raise SimcacheError("the text holds no sequence of two or more tokens")
        except BaseException:
            writer.abort()
            raise
        writer.close()
    finally:
        tap.close()
    return CaptureStats(tokens, requests, time.perf_counter() - start)


def capture_generate(model, tokenizer, arch, prompts: list[str], out, *, name="model", new_tokens=64,
                     overwrite=False, progress=None, domain: str | None = None, resume=False,
                     lookahead=False, group_rows=None) -> CaptureStats:
    """Greedy generation of ``new_tokens`` tokens from each prompt, one sequence at a time:
    prompt tokens are recorded as prefill (phase 0), generated tokens fed back as decode.
    ``resume`` and ``lookahead`` as in :func:`capture_text` (a unit is one prompt)."""
    import torch

    if arch.seq2seq:
        raise SimcacheError("generation capture supports decoder-only models; use --text for Switch")
    if new_tokens < 1:
        raise SimcacheError(f"--generate must be positive, got {new_tokens}")
    ctx = context_length(model)
    device = model.get_input_embeddings().weight.device
    tap = RouterTap(model)
    meta = _metadata(model, tap, arch, name, f"greedy generation of {new_tokens} tokens",
                     [f"{len(prompts)} prompts"])
    L, k = tap.num_layers, meta["top_k"]
    width = min(2 * k, meta["num_experts"]) if lookahead else 0
    if lookahead:
        tap.close()
        tap = RouterTap(model, lookahead=width)
        meta["lookahead"] = LOOKAHEAD_NOTE
    key = _key(meta, prompts, dict(new_tokens=new_tokens, domain=domain, lookahead=width))
    # the key-value cache argument is ``cache`` in the transformers this is tested with (5.24),
    # ``past_key_values`` in older releases
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    start = time.perf_counter()
    try:
        writer = _Sink(out, meta, overwrite=overwrite, resume=resume,
                       group_rows=group_rows or ROW_GROUP_ROWS, key=key)
    except BaseException:
        tap.close()
        raise
    tokens = writer.tokens
    try:
        try:
            for r, prompt in enumerate(prompts):
                if r < writer.units_done:
                    continue
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
                if ids.shape[1] == 0:
                    raise SimcacheError(f"prompt {r} is empty")
                if ctx is not None and ids.shape[1] + new_tokens > ctx:
                    raise SimcacheError(
                        f"prompt {r} ({ids.shape[1]} tokens) plus {new_tokens} new tokens exceeds the "
                        f"model's context of {ctx}")
                rows = []
                position = 0
                cur = ids
                past = {}
                with torch.inference_mode():
                    for step in range(new_tokens):
                        out_ = model(input_ids=cur, use_cache=True, **past)
                        past = {cache_arg: getattr(out_, cache_arg)}
                        choices = tap.take()
                        n = cur.shape[1]
                        experts = np.stack([c[0] for c in choices], axis=1)
                        weights = np.stack([c[1] for c in choices], axis=1)
                        la = _lookahead_rows(tap, n, L, width) if width else (None, None)
                        rows.append((position, n, step > 0, cur[0].cpu().numpy(), experts, weights, la))
                        position += n
                        cur = out_.logits[:, -1:].to(device).argmax(dim=-1)
                for position, n, decode, tok, experts, weights, (la, ls) in rows:
                    pos = np.repeat(np.arange(position, position + n, dtype=np.int32), L)
                    writer.write(
                        request=np.full(n * L, r, np.int32), position=pos,
                        phase=np.full(n * L, 1 if decode else 0, np.int8),
                        layer=np.tile(np.arange(L, dtype=np.int16), n),
                        experts=experts.reshape(-1, k), weights=weights.reshape(-1, k),
                        token_id=np.repeat(tok, L),
                        domain=None if domain is None else [domain] * (n * L),
                        lookahead=la, lookahead_scores=ls,
                    )
                    tokens += n
                writer.unit_done(r + 1, tokens)
                if progress is not None:
                    progress(1)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    finally:
        tap.close()
    return CaptureStats(tokens, len(prompts), time.perf_counter() - start)


def _shift_right(model, ids):
    """Decoder inputs for teacher forcing an encoder-decoder on the same text."""
    cfg = model.config
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = getattr(cfg, "pad_token_id", None) or 0
    shifted = ids.new_full(ids.shape, start)
    shifted[:, 1:] = ids[:, :-1]
    return shifted
