"""Tables with one row per (token, layer), or one row per token holding every layer's list.

JSON lines (``.jsonl``, ``.json``, ``.gz`` of either) and Parquet files go through here,
read in blocks by Arrow so the text of a file is never held whole. Columns are named by the
caller or guessed from common names (:data:`FIELD_GUESSES`).

MoE-PolicyLang writes both kinds (``moe_policylang/integrations/trace_recorder.py``,
``TraceRecording.save_parquet`` / ``save_jsonl``): Parquet columns ``prompt_id, token_idx,
layer_idx, selected_experts, router_scores, router_softmax, token_id, phase, domain_tag`` and
JSON lines with one header object (``model_name, num_layers, num_experts, top_k, ...``) then
one short-keyed object per entry (``p, t, l, e, s, sm, ti, ph, dm``). Both are recognised
without options, and the header's model shape goes into the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from simcache.errors import SimcacheError
from simcache.importers._records import Records, first_appearance
from simcache.trace import NO_EXPERT

# Column names tried, in order, when the caller names none.
FIELD_GUESSES = {
    "request": ("request", "prompt_id", "sequence", "seq_id", "request_id", "sample"),
    "position": ("position", "token_idx", "pos", "token_index"),
    "layer": ("layer", "layer_idx", "layer_id", "moe_layer"),
    "experts": ("experts", "selected_experts", "expert_ids", "topk_ids", "indices", "top_indices"),
    "weights": ("weights", "routing_weights", "topk_weights", "router_scores", "scores",
                "gate_weights", "gating_probs"),
    "token_id": ("token_id", "token", "input_id"),
    "domain": ("domain", "domain_tag", "source", "category"),
    "phase": ("phase",),
    "router_softmax": ("router_softmax", "router_probs"),
}
# MoE-PolicyLang's JSON-lines keys (TraceRecording.save_jsonl)
POLICYLANG_JSONL = {"request": "p", "position": "t", "layer": "l", "experts": "e", "weights": "s",
                    "router_softmax": "sm", "token_id": "ti", "phase": "ph", "domain": "dm"}
PHASE_NAMES = {"prefill": 0, "prompt": 0, "decode": 1, "generate": 1, "generation": 1}
BLOCK_BYTES = 16 << 20


def read_tables(paths: list[Path], *, fmt: str, request=None, position=None, layer=None, experts=None,
                weights=None, token_id=None, domain=None) -> Records:
    """Read several table sources into one :class:`Records`; request keys are shared."""
    given = dict(request=request, position=position, layer=layer, experts=experts, weights=weights,
                 token_id=token_id, domain=domain)
    parts = []
    meta: dict = {}
    for path in paths:
        part, header = _read_one(path, fmt, given)
        parts.append(part)
        if header:
            meta.update({k: header[k] for k in ("model_name", "num_layers", "num_experts", "top_k") if k in header})
    names = parts[0]["request_fields"]
    for path, part in zip(paths, parts):
        if part["request_fields"] != names:
            raise SimcacheError(f"{path}: request key columns {part['request_fields']} differ from "
                                f"{names} in {paths[0]}")
    where, start = [], 0
    for path, part in zip(paths, parts):
        where.append((path.name, start))
        start += part["n"]

    def cat(name):
        values = [part[name] for part in parts]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            missing = next(p for p, v in zip(paths, values) if v is None)
            raise SimcacheError(f"{missing}: has no {name} column while another input has one")
        return np.concatenate(values)

    if names:
        keys = [np.concatenate([part["request"][i] for part in parts]) for i in range(len(names))]
        req, key_values = first_appearance(*keys)
        request_keys = {"fields": names, "values": key_values}
    else:  # no request column: each file is one request
        req = np.concatenate([np.full(part["n"], i, np.int64) for i, part in enumerate(parts)])
        request_keys = {"fields": ["file"], "values": [[p.name] for p in paths]}
    width = max(part["experts"].shape[1] for part in parts)
    exp = np.concatenate([_widen(part["experts"], width, NO_EXPERT) for part in parts])
    w = [part["weights"] for part in parts]
    wts = None if any(x is None for x in w) else np.concatenate([_widen(x, width, 0.0) for x in w])
    rec = Records(
        request=req, position=cat("position"), layer=cat("layer"), experts=exp, weights=wts,
        phase=cat("phase"), token_id=cat("token_id"), domain=cat("domain"), where=where,
        metadata={"request_keys": request_keys},
    )
    soft_E = {part["softmax_width"] for part in parts if part["softmax_width"]}
    if soft_E:
        rec.metadata["router_softmax_width"] = max(soft_E)
    if meta:
        rec.metadata["source_header"] = meta
    return rec


def _widen(a: np.ndarray, width: int, fill) -> np.ndarray:
    if a.shape[1] == width:
        return a
    out = np.full((a.shape[0], width), fill, a.dtype)
    out[:, : a.shape[1]] = a
    return out


# ---- one file ---------------------------------------------------------------------------


def _read_one(path: Path, fmt: str, given: dict):
    header = None
    if fmt == "parquet":
        batches, names = _parquet_batches(path)
    else:
        header = _policylang_header(path)
        batches, names = _jsonl_batches(path, skip_first=header is not None)
        if header is not None:
            given = {k: (v if v is not None or POLICYLANG_JSONL.get(k) not in names
                         else POLICYLANG_JSONL[k]) for k, v in given.items()}
    fields = _pick(path, names, given, policylang=header is not None)
    out = _collect(path, batches, fields)
    return out, header


def _pick(path, names, given, policylang):
    names = list(names)

    def pick(field, value):
        if value is not None:
            if value not in names:
                raise SimcacheError(f"{path}: no column '{value}' for {field} (columns: {', '.join(names)})")
            return value
        for guess in FIELD_GUESSES[field]:
            if guess in names:
                return guess
        return None

    req = given["request"]
    if req is not None:
        req_fields = [f.strip() for f in req.split(",") if f.strip()] if isinstance(req, str) else list(req)
        for f in req_fields:
            pick("request", f)
    else:
        g = pick("request", None)
        req_fields = [g] if g else []
    fields = {"request": req_fields}
    for field in ("position", "layer", "experts", "weights", "token_id", "domain"):
        fields[field] = pick(field, given[field])
    fields["phase"] = pick("phase", POLICYLANG_JSONL["phase"] if policylang and "ph" in names else None)
    fields["router_softmax"] = pick("router_softmax", POLICYLANG_JSONL["router_softmax"]
                                    if policylang and "sm" in names else None)
    if fields["experts"] is None:
        raise SimcacheError(f"{path}: no experts column found (columns: {', '.join(names)}); name it with --experts")
    return fields


def _policylang_header(path: Path) -> dict | None:
    """MoE-PolicyLang's JSON-lines header object, or None."""
    import pyarrow as pa

    try:
        with pa.input_stream(str(path), compression="detect") as f:
            line = f.read(1 << 16).split(b"\n", 1)[0]
        first = json.loads(line)
    except (ValueError, OSError, pa.ArrowInvalid):
        return None
    if isinstance(first, dict) and {"model_name", "num_layers", "num_experts", "top_k"} <= set(first):
        return first
    return None


def _jsonl_batches(path: Path, skip_first: bool):
    import pyarrow as pa
    import pyarrow.json as pj

    opts = pj.ReadOptions(block_size=BLOCK_BYTES, use_threads=True)
    try:
        stream = pa.input_stream(str(path), compression="detect")
        reader = pj.open_json(stream, read_options=opts)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimcacheError(f"{path}: not a JSON object per line ({_first_line(exc)})") from None
    names = reader.schema.names

    def batches():
        first = skip_first
        try:
            for batch in reader:
                if first:
                    batch = batch.slice(1)
                    first = False
                yield batch
        except (pa.ArrowInvalid, OSError) as exc:
            raise SimcacheError(f"{path}: not a JSON object per line ({_first_line(exc)})") from None

    return batches(), names


def _parquet_batches(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimcacheError(f"{path} is not a Parquet file ({_first_line(exc)})") from None
    if b"simcache" in (pf.schema_arrow.metadata or {}):
        raise SimcacheError(f"{path} is already a simcache trace")
    return pf.iter_batches(batch_size=1 << 20), pf.schema_arrow.names


def _collect(path, batches: Iterator, fields) -> dict:
    """Numpy columns of the picked fields, block by block."""
    acc: dict[str, list] = {k: [] for k in ("request", "position", "layer", "experts", "weights",
                                             "phase", "token_id", "domain", "soft")}
    per_token = None
    n = 0
    soft_width = 0
    labels: dict = {}  # string key values -> codes (kept small: one entry per distinct value)
    for batch in batches:
        m = batch.num_rows
        if m == 0:
            continue
        exp_col = batch.column(fields["experts"])
        if per_token is None:
            per_token = _is_nested(exp_col.type)
            if not per_token and fields["layer"] is None:
                raise SimcacheError(f"{path}: no layer column found; name it with --layer "
                                    f"(or give per-token lists of per-layer lists)")
        exp, layers = _ids(path, exp_col, per_token, n)
        rep = layers if per_token else 1
        acc["experts"].append(exp)
        if fields["weights"] is not None:
            w, _ = _floats(path, batch.column(fields["weights"]), per_token, n, fields["weights"])
            if w.shape[0] != exp.shape[0]:
                raise SimcacheError(f"{path}: weights do not match the experts row for row")
            acc["weights"].append(_match_width(path, w, exp, fields["weights"], n))
        elif fields["router_softmax"] is not None:
            dense, _ = _floats(path, batch.column(fields["router_softmax"]), per_token, n,
                               fields["router_softmax"])
            soft_width = max(soft_width, dense.shape[1])
            acc["weights"].append(np.where(exp >= 0, np.take_along_axis(
                dense, np.clip(exp, 0, dense.shape[1] - 1), axis=1), 0.0).astype(np.float32))
        acc["request"].append([_scalars(path, batch.column(f), f, n, labels=labels)
                               for f in fields["request"]])
        if per_token:
            acc["layer"].append(np.tile(np.arange(layers, dtype=np.int64), m))
        else:
            acc["layer"].append(_scalars(path, batch.column(fields["layer"]), fields["layer"], n))
        if fields["position"] is not None:
            acc["position"].append(_scalars(path, batch.column(fields["position"]), fields["position"], n))
        for name in ("token_id", "phase", "domain"):
            f = fields[name]
            if f is None:
                continue
            col = batch.column(f)
            if name == "phase":
                v = _phase(path, col, f, n)
            elif name == "domain":
                v = np.asarray(col.to_pylist(), dtype=object)
            else:
                v = _scalars(path, col, f, n)
            acc[name].append(v)
        n += m
        acc["rep"] = rep
    if n == 0:
        raise SimcacheError(f"{path}: no records")
    rep = acc.get("rep", 1)

    def expand(parts):
        v = np.concatenate(parts)
        return np.repeat(v, rep) if rep > 1 else v

    req_fields = fields["request"]
    req = [expand([chunk[i] for chunk in acc["request"]]) for i in range(len(req_fields))]
    if labels:  # string codes back to their values: only the distinct ones become objects
        table = np.empty(len(labels), dtype=object)
        for value, code in labels.items():
            table[code] = value
        req = [table[c - _STRING] if c.dtype == np.int64 and c.size and c.min() >= _STRING else c for c in req]
    out = {
        "n": n * rep,
        "request_fields": req_fields,
        "request": req,
        "layer": np.concatenate(acc["layer"]),
        "experts": np.concatenate(acc["experts"]),
        "weights": np.concatenate(acc["weights"]) if acc["weights"] else None,
        "phase": expand(acc["phase"]) if acc["phase"] else None,
        "token_id": expand(acc["token_id"]) if acc["token_id"] else None,
        "domain": expand(acc["domain"]) if acc["domain"] else None,
        "softmax_width": soft_width,
    }
    if acc["position"]:
        out["position"] = expand(acc["position"])
    else:  # number tokens in order inside each (request, layer)
        out["position"] = _number_in_order(req, out["layer"])
    return out


def _number_in_order(req_cols, layer):
    import pandas as pd

    keys = [pd.factorize(c, use_na_sentinel=False)[0] for c in req_cols] + [layer]
    df = pd.DataFrame({str(i): k for i, k in enumerate(keys)})
    return df.groupby(list(df.columns), sort=False).cumcount().to_numpy(np.int64)


def _is_nested(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
        pa.types.is_list(t.value_type) or pa.types.is_large_list(t.value_type)
        or pa.types.is_fixed_size_list(t.value_type))


def _ragged(path, col, n0, name, dtype, fill):
    """A list column -> (rows, max length) array padded with ``fill``; lengths (rows,)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise SimcacheError(f"{path}: column '{name}' must hold a list per record, got {t}")
    if col.null_count:
        i = n0 + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]) + 1
        raise SimcacheError(f"{path}, record {i}: '{name}' is null")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(col)
    if values.null_count:
        raise SimcacheError(f"{path}: column '{name}' has null entries inside its lists")
    flat = values.to_numpy(zero_copy_only=False)
    if not np.issubdtype(flat.dtype, np.number):
        raise SimcacheError(f"{path}: column '{name}' does not hold numbers")
    if np.issubdtype(dtype, np.integer) and flat.size and np.abs(flat).max() > np.iinfo(dtype).max:
        raise SimcacheError(f"{path}: column '{name}' holds {np.abs(flat).max():g}, not an expert id")
    flat = flat.astype(dtype)
    rows = lengths.shape[0]
    k = int(lengths.max()) if rows else 0
    if rows and (lengths == k).all():
        return flat.reshape(rows, k), lengths
    out = np.full((rows, k), fill, dtype)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    r = np.repeat(np.arange(rows), lengths)
    out[r, np.arange(flat.shape[0]) - np.repeat(starts, lengths)] = flat
    return out, lengths


def _ids(path, col, per_token, n0):
    import pyarrow.compute as pc

    if not per_token:
        exp, _ = _ragged(path, col, n0, "experts", np.int32, NO_EXPERT)
        _integral(path, col, "experts")
        return exp, 1
    layers = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if layers.size and not (layers == layers[0]).all():
        i = n0 + int(np.flatnonzero(layers != layers[0])[0]) + 1
        raise SimcacheError(f"{path}, record {i}: per-token lists have {int(layers[i - n0 - 1])} layers, "
                            f"the first record has {int(layers[0])}")
    exp, _ = _ragged(path, pc.list_flatten(col), n0, "experts", np.int32, NO_EXPERT)
    return exp, int(layers[0]) if layers.size else 0


def _integral(path, col, name):
    import pyarrow as pa
    import pyarrow.compute as pc

    vt = pc.list_flatten(col).type
    if not pa.types.is_integer(vt):
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        if not np.all(np.isfinite(flat)) or not np.all(flat == np.round(flat)):
            raise SimcacheError(f"{path}: column '{name}' must hold integer expert ids")


def _floats(path, col, per_token, n0, name):
    import pyarrow.compute as pc

    if per_token:
        col = pc.list_flatten(col)
    return _ragged(path, col, n0, name, np.float32, 0.0)


def _match_width(path, w, exp, name, n0):
    if w.shape[1] < exp.shape[1]:
        raise SimcacheError(f"{path}: '{name}' has fewer entries than experts in some record")
    w = w[:, : exp.shape[1]]
    return np.where(exp >= 0, w, 0.0).astype(np.float32)


_STRING = 1 << 62  # string key codes live above every integer id a file could hold


def _scalars(path, col, name, n0, labels=None):
    """An integer column as int64; with ``labels``, a string column as codes into ``labels``
    (shifted by _STRING), so ten million rows of a key do not become ten million objects."""
    import pyarrow as pa

    if col.null_count:
        i = n0 + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]) + 1
        raise SimcacheError(f"{path}, record {i}: '{name}' is null")
    if labels is not None and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        enc = col.dictionary_encode()
        local = np.array([labels.setdefault(v, len(labels)) for v in enc.dictionary.to_pylist()], np.int64)
        return local[enc.indices.to_numpy(zero_copy_only=False)] + _STRING
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise SimcacheError(f"{path}: column '{name}' must hold integers, got {col.type}")
    a = col.to_numpy(zero_copy_only=False)
    if not pa.types.is_integer(col.type) and (not np.all(np.isfinite(a)) or not np.all(a == np.round(a))):
        raise SimcacheError(f"{path}: column '{name}' must hold integers")
    return a.astype(np.int64)


def _phase(path, col, name, n0):
    import pyarrow as pa

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = col.to_pylist()
        try:
            return np.array([PHASE_NAMES[str(v).lower()] for v in values], np.int8)
        except KeyError as exc:
            raise SimcacheError(f"{path}: phase {exc.args[0]!r} is not one of "
                                f"{', '.join(PHASE_NAMES)} (or 0 / 1)") from None
    return _scalars(path, col, name, n0).astype(np.int8)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
