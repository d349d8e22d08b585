"""Per-request ``routed_experts`` as SGLang and vLLM return them (``--enable-return-routed-experts``).

Sources: sgl-project/sglang ``python/sglang/srt/layers/moe/routed_experts_capturer.py`` keeps
an int32 buffer [tokens, num_hidden_layers, num_experts_per_tok] filled by each MoE layer's
top-k; the response carries it in ``meta_info["routed_experts"]`` as base64 of those int32
bytes, decoded by clients as ``np.frombuffer(b64decode(s), np.int32).reshape(-1, layers,
top_k)`` (sgl-project/sglang-jax ``docs/features/return_routed_experts.md`` documents the same
payload, with -1 where a layer has no routed expert). One array covers the prompt and the
completion but the last generated token, which is never forwarded (prompt_tokens +
completion_tokens - 1 rows), as RL frameworks that consume it assert. vLLM returns the same
[tokens, layers, k] array per request; its exact response field could not be confirmed from
the sources stored here, so a vLLM array is read from a ``.npy`` file per request, or from a
nested list under ``routed_experts`` (top level, ``meta_info`` or ``choices[0]``).

Inputs: a JSON-lines file of responses (one per line), a ``.json`` file per response, or a
folder of ``.npy`` files (one per request, named by it; an optional ``NAME.json`` beside it
gives ``prompt_tokens`` / ``cached_tokens``). Prompt tokens are prefill (phase 0) when
``prompt_tokens`` is known, the rest decode. The first ``cached_tokens`` prompt tokens were
served from the prefix cache: their ids were computed for an earlier request, so they become
gap rows and the workload skips them. A layer whose rows are all -1, or all one repeated id
(SGLang's buffer spans every hidden layer, and a dense layer's rows are never written), is left
out and listed in the metadata.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import numpy as np

from simcache.errors import SimcacheError
from simcache.importers._records import Records
from simcache.trace import NO_EXPERT


def read_routed(paths: list[Path], top_k: int | None = None, layers: int | None = None) -> Records:
    """Records of routed_experts responses (see the module docstring). A base64 payload is
    flat: give ``top_k`` or ``layers`` (hidden layers) when the response does not say."""
    items = []  # (name, where, array [tokens, layers, k], prompt_tokens, cached_tokens)
    for path in paths:
        if path.is_dir():
            items += _folder(path, top_k, layers)
        else:
            items += _responses(path, top_k, layers)
    if not items:
        raise SimcacheError(f"{paths[0]}: no routed_experts found")
    L = items[0][2].shape[1]
    for name, where, a, _, _ in items:
        if a.shape[1] != L:
            raise SimcacheError(f"{where}: {a.shape[1]} layers, {items[0][1]} has {L}")
    parts = {k: [] for k in ("request", "position", "phase", "experts", "layer")}
    keys, where_list, start, cached_total = [], [], 0, 0
    for r, (name, where, a, prompt, cached) in enumerate(items):
        T, _, k = a.shape
        a = a.copy()
        if cached:
            a[: min(cached, T)] = NO_EXPERT
            cached_total += min(cached, T)
        phase = np.ones(T, np.int8)
        if prompt is not None:
            phase[: min(prompt, T)] = 0
        parts["request"].append(np.full(T * L, r))
        parts["position"].append(np.repeat(np.arange(T), L))
        parts["phase"].append(np.repeat(phase, L))
        parts["layer"].append(np.tile(np.arange(L), T))
        parts["experts"].append(a.reshape(T * L, k))
        keys.append([name])
        where_list.append((where, start))
        start += T * L
    width = max(x.shape[1] for x in parts["experts"])
    experts = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=NO_EXPERT)
                              for x in parts["experts"]])
    layer = np.concatenate(parts["layer"])
    dense = []
    for l in range(L):
        rows = experts[layer == l]
        real = rows[rows[:, 0] != NO_EXPERT]
        if real.size == 0 or (width > 1 and (real == real[0, 0]).all()):
            dense.append(l)
    keep_layer = np.setdiff1d(np.arange(L), dense)
    if keep_layer.size == 0:
        raise SimcacheError(f"{paths[0]}: no layer holds routing (every layer is all -1 or one repeated id)")
    meta = {"capture": "routed_experts returned by the serving engine", "request_keys":
            {"fields": ["response"], "values": keys}}
    if cached_total:
        meta["prefix_cached_tokens"] = int(cached_total)
    req, pos, ph = (np.concatenate(parts[k]) for k in ("request", "position", "phase"))
    if dense:
        meta["dense_layers_left_out"] = dense
        keep = np.isin(layer, keep_layer)
        renumber = np.full(L, -1)
        renumber[keep_layer] = np.arange(keep_layer.size)
        experts, layer, req, pos, ph = experts[keep], renumber[layer[keep]], req[keep], pos[keep], ph[keep]
    meta.update(first_layer=0, num_layers=int(keep_layer.size))
    return Records(request=req, position=pos, layer=layer, experts=experts, phase=ph,
                   where=where_list, metadata=meta)


def _folder(folder: Path, top_k, layers):
    out = []
    npys = sorted(folder.glob("*.npy"))
    for f in npys:
        try:
            a = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SimcacheError(f"{f}: not a numpy array ({str(exc).splitlines()[0]})") from None
        side = f.with_suffix(".json")
        info = {}
        if side.exists():
            try:
                info = json.loads(side.read_text())
            except ValueError:
                raise SimcacheError(f"{side}: not JSON") from None
        out.append((f.stem, f.name, _checked(a, f.name), _int_or_none(info, "prompt_tokens", side),
                    _int_or_none(info, "cached_tokens", side) or 0))
    stems = {f.stem for f in npys}
    for f in sorted(folder.glob("*.json")):
        if f.stem not in stems:
            out += _responses(f, top_k, layers)
    return out


def _responses(path: Path, top_k, layers):
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    out = []
    try:
        with opener(path, "rt") as fh:
            text = fh.read()
    except OSError as exc:
        raise SimcacheError(f"{path}: cannot read ({exc})") from None
    lines = [text] if path.suffix == ".json" else text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = path.name if path.suffix == ".json" else f"{path.name}, line {n}"
        try:
            resp = json.loads(line)
        except ValueError:
            raise SimcacheError(f"{where}: not a JSON object") from None
        if not isinstance(resp, dict):
            raise SimcacheError(f"{where}: not a JSON object")
        meta = resp.get("meta_info") or {}
        choice = (resp.get("choices") or [{}])[0] if isinstance(resp.get("choices"), list) else {}
        payload = next((x.get("routed_experts") for x in (meta, resp, choice)
                        if isinstance(x, dict) and x.get("routed_experts") is not None), None)
        if payload is None:
            raise SimcacheError(f"{where}: no routed_experts (in meta_info, at top level or in choices[0])")
        prompt = _int_or_none(meta, "prompt_tokens", where)
        completion = _int_or_none(meta, "completion_tokens", where)
        cached = _int_or_none(meta, "cached_tokens", where) or 0
        if isinstance(payload, str):
            a = _decode(payload, where, prompt, completion, top_k, layers)
        else:
            try:
                a = np.asarray(payload, np.int64)
            except (ValueError, TypeError):
                raise SimcacheError(f"{where}: routed_experts is neither base64 nor a [tokens][layers][k] list") from None
        name = str(meta.get("id", resp.get("id", f"{path.stem}:{n}")))
        out.append((name, where, _checked(a, where), prompt, cached))
    return out


def _decode(payload, where, prompt, completion, top_k, layers):
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise SimcacheError(f"{where}: routed_experts is not valid base64") from None
    if len(raw) % 4:
        raise SimcacheError(f"{where}: routed_experts holds {len(raw)} bytes, not whole int32 values")
    flat = np.frombuffer(raw, np.int32).astype(np.int64)
    tokens = None if prompt is None or completion is None else prompt + completion - 1
    per = None
    if top_k and layers:
        per = top_k * layers
    elif tokens:
        if flat.size % tokens:
            raise SimcacheError(f"{where}: {flat.size} ids are not a whole number per token for "
                                f"{tokens} tokens (prompt_tokens + completion_tokens - 1)")
        per = flat.size // tokens
    if per is None or not (top_k or layers):
        raise SimcacheError(f"{where}: a base64 routed_experts payload is flat; give the model's "
                            f"top-k (--top-k) or hidden layer count (--layers)")
    k = top_k or per // layers
    L = layers or per // k
    if k * L != per or flat.size % per:
        shown = f"{tokens} tokens (prompt + completion - 1)" if tokens else "tokens"
        raise SimcacheError(f"{where}: {flat.size} ids do not reshape to [{shown}, layers, top-{k}]")
    return flat.reshape(-1, L, k)


def _checked(a, where):
    if a.ndim != 3:
        raise SimcacheError(f"{where}: routed_experts must be [tokens, layers, k], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise SimcacheError(f"{where}: routed_experts must hold integer ids, got {a.dtype}")
    if a.shape[0] == 0:
        raise SimcacheError(f"{where}: routed_experts has no tokens")
    return a.astype(np.int64)


def _int_or_none(d, key, where):
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or v < 0:
        raise SimcacheError(f"{where}: {key} must be a non-negative integer, got {v!r}")
    return v
