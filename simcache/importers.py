"""Bring foreign routing traces into the simcache format.

* :func:`import_table` — any table with one row per (request, position, layer), or one row
  per token holding every layer's expert list; columns named by the caller. JSONL files and
  other tools' Parquet files go through it; MoE-PolicyLang's ``prompt_id / token_idx /
  layer_idx / selected_experts`` columns are recognised without options.
* :func:`import_flame` — the FLAME-MoE-290M routing sample (DESIGN §9).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from simcache.errors import SimcacheError
from simcache.trace import Trace

# Column names tried, in order, when the caller names none.
FIELD_GUESSES = {
    "request": ("request", "prompt_id", "sequence", "seq_id", "request_id", "sample"),
    "position": ("position", "token_idx", "pos", "token_index", "t"),
    "layer": ("layer", "layer_idx", "layer_id", "moe_layer"),
    "experts": ("experts", "selected_experts", "expert_ids", "topk_ids", "indices", "top_indices"),
    "weights": ("weights", "routing_weights", "topk_weights", "scores", "gate_weights"),
    "token_id": ("token_id", "token", "input_id"),
    "domain": ("domain", "source", "category"),
    "phase": ("phase",),
    "router_softmax": ("router_softmax", "router_probs"),
}


def import_file(path, *, fmt: str | None = None, **options) -> Trace:
    """Read a foreign trace file (``.jsonl`` / ``.json`` lines or ``.parquet``) and convert it.

    ``options`` go to :func:`import_table` (field names, ``num_experts``, metadata).
    """
    path = Path(path)
    if not path.exists():
        raise SimcacheError(f"input file not found: {path}")
    fmt = fmt or ("parquet" if path.suffix == ".parquet" else "jsonl")
    if fmt == "flame":
        return import_flame(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SimcacheError(f"{path} is not a Parquet file ({str(exc).splitlines()[0]})") from None
        if b"simcache" in (table.schema.metadata or {}):
            raise SimcacheError(f"{path} is already a simcache trace")
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
    elif fmt == "jsonl":
        columns = _read_jsonl(path)
    else:
        raise SimcacheError(f"unknown input format '{fmt}' (jsonl, parquet, flame)")
    options.setdefault("source", str(path.name))
    return import_table(columns, **options)


def _read_jsonl(path: Path) -> dict[str, list]:
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise SimcacheError(f"{path}:{n}: not a JSON object per line") from None
            if not isinstance(rec, dict):
                raise SimcacheError(f"{path}:{n}: each line must be a JSON object")
            rows.append(rec)
    if not rows:
        raise SimcacheError(f"{path}: no records")
    names = list(dict.fromkeys(k for rec in rows for k in rec))
    return {k: [rec.get(k) for rec in rows] for k in names}


def import_table(
    columns: dict[str, list],
    *,
    request: str | None = None,
    position: str | None = None,
    layer: str | None = None,
    experts: str | None = None,
    weights: str | None = None,
    token_id: str | None = None,
    domain: str | None = None,
    num_experts: int | None = None,
    source: str = "",
    **metadata,
) -> Trace:
    """Convert a column dict (name -> list of values) to a :class:`Trace`.

    Each field takes a column name; unnamed fields are guessed from common names
    (``FIELD_GUESSES``). ``experts`` may hold, per row, a list of k experts (one row per
    layer, with a layer column) or a list of per-layer lists (one row per token, no layer
    column). Missing positions are numbered in order inside each request; a missing request
    column makes the whole file one request. ``num_experts`` defaults to the largest id + 1,
    or to the width of a dense ``router_softmax`` column when there is one (its values at the
    chosen experts become the weights).
    """
    names = list(columns)
    if not names:
        raise SimcacheError("input has no columns")

    def pick(field, given):
        if given is not None:
            if given not in columns:
                raise SimcacheError(f"no column '{given}' for {field} (columns: {', '.join(names)})")
            return given
        for guess in FIELD_GUESSES[field]:
            if guess in columns:
                return guess
        return None

    f_experts = pick("experts", experts)
    if f_experts is None:
        raise SimcacheError(f"no experts column found (columns: {', '.join(names)}); name it with --experts")
    f_req, f_pos, f_layer = pick("request", request), pick("position", position), pick("layer", layer)
    f_w, f_tok, f_dom = pick("weights", weights), pick("token_id", token_id), pick("domain", domain)
    f_soft = pick("router_softmax", None)
    f_phase = pick("phase", None)

    raw = columns[f_experts]
    n = len(raw)
    if n == 0:
        raise SimcacheError("input has no rows")
    first = next((x for x in raw if x is not None), None)
    per_token = first is not None and len(first) > 0 and isinstance(first[0], (list, tuple))
    try:
        exp = np.asarray(raw, dtype=np.float64)  # not int64: that would truncate 2.9 to 2
    except (ValueError, TypeError):
        raise SimcacheError("expert lists do not all have the same length (top-k must be fixed)") from None
    if not (np.isfinite(exp).all() and (exp == np.round(exp)).all()):
        bad = exp[~(np.isfinite(exp) & (exp == np.round(exp)))].ravel()[0]
        raise SimcacheError(f"expert ids must be whole numbers, got {bad:g}")
    exp = exp.astype(np.int64)
    wts = None
    if f_w is not None:
        try:
            wts = np.asarray(columns[f_w], dtype=np.float32)
        except (ValueError, TypeError):
            raise SimcacheError(f"weights column '{f_w}' is not a fixed-length list of numbers") from None
        if wts.shape != exp.shape:
            raise SimcacheError(f"weights shape {wts.shape} does not match experts shape {exp.shape}")
    if per_token:
        if exp.ndim != 3:
            raise SimcacheError("per-token expert lists must be [layers][k]")
        n_layers = exp.shape[1]
        layer_ids = np.tile(np.arange(n_layers), n)
        rep = n_layers
        exp = exp.reshape(-1, exp.shape[2])
        if wts is not None:
            wts = wts.reshape(-1, wts.shape[2])
    else:
        if exp.ndim != 2:
            raise SimcacheError("experts must be a list of k expert ids per row")
        if f_layer is None:
            raise SimcacheError("no layer column found; name it with --layer (or give per-token lists)")
        layer_ids = _ints(columns[f_layer], f_layer)
        rep = 1

    def expand(values):
        return np.repeat(np.asarray(values, dtype=object), rep) if rep > 1 else np.asarray(values, dtype=object)

    if f_req is None:
        req = np.zeros(n, np.int64)
    else:
        req = _ints(columns[f_req], f_req)
    if f_pos is None:
        # number tokens in order inside each request
        pos = np.zeros(n, np.int64)
        counters: dict[int, int] = {}
        seen_layer_tokens: dict[tuple, int] = {}
        for i in range(n):
            r = int(req[i])
            if per_token:
                pos[i] = counters.get(r, 0)
                counters[r] = pos[i] + 1
            else:
                key = (r, int(layer_ids[i]))
                pos[i] = seen_layer_tokens.get(key, 0)
                seen_layer_tokens[key] = pos[i] + 1
    else:
        pos = _ints(columns[f_pos], f_pos)
    if rep > 1:
        req, pos = np.repeat(req, rep), np.repeat(pos, rep)
    if f_soft is not None and wts is None:
        soft = columns[f_soft]
        try:
            dense = np.asarray(soft, dtype=np.float32)
        except (ValueError, TypeError):
            raise SimcacheError(f"'{f_soft}' is not a dense list of probabilities per row") from None
        if rep > 1:
            dense = dense.reshape(-1, dense.shape[-1])
        if num_experts is None:
            num_experts = dense.shape[-1]
        wts = np.take_along_axis(dense, np.clip(exp, 0, dense.shape[-1] - 1), axis=1)
    if num_experts is None:
        num_experts = int(exp.max()) + 1
    phase = None
    if f_phase is not None:
        phase = _ints(columns[f_phase], f_phase)
        if rep > 1:
            phase = np.repeat(phase, rep)
    meta = {"model": metadata.pop("model", "unknown"), "capture": f"imported from {source}".strip(), **metadata}
    if source:
        meta["source"] = source
    return Trace.from_arrays(
        exp,
        request=_renumber(req),
        position=pos,
        layer=layer_ids,
        num_experts=int(num_experts),
        phase=phase,
        weights=wts,
        token_id=None if f_tok is None else np.asarray(expand(columns[f_tok]), dtype=np.int64),
        domain=None if f_dom is None else expand(columns[f_dom]),
        **meta,
    )


def _ints(values, name) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise SimcacheError(f"column '{name}' must hold integers") from None
    if a.ndim != 1 or not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
        raise SimcacheError(f"column '{name}' must hold integers")
    return a.astype(np.int64)


def _renumber(req: np.ndarray) -> np.ndarray:
    """Request ids as given when they fit int32, else their rank."""
    if req.size and (req.min() < 0 or req.max() > np.iinfo(np.int32).max):
        return np.unique(req, return_inverse=True)[1]
    return req


# ---- FLAME-MoE-290M ------------------------------------------------------------------------

FLAME_LAYERS = 8
FLAME_EXPERTS = 64
FLAME_TOP_K = 6
# (1.3e9 total - 290e6 active) parameters sit in the 8 x (64 - 6) routed experts a token does
# not use, at 2 bytes each (bf16). The published counts are rounded, so this is an estimate.
FLAME_EXPERT_BYTES = int(round((1.3e9 - 290e6) / (FLAME_LAYERS * (FLAME_EXPERTS - FLAME_TOP_K)) * 2))


def import_flame(path) -> Trace:
    """Convert the FLAME-MoE-290M routing sample (``flame_moe_290m_iter5473_routing.parquet``).

    The sample holds one contiguous 2,048-token block (stream positions 0..2047) and the first
    10 tokens of 512-token windows r = 0..63 (stream position 512 r + p). Windows 0..3 lie
    inside the block, so the trace has request 0 = the block (positions 0..2047) and requests
    1..60 = windows 4..63 (positions 0..9 inside the window). Transformer layers 2..9 become
    MoE layers 0..7. The routing is teacher-forced over the pretraining stream, which is what
    decoding that text would route, so every token is marked decode (phase 1). The weights are
    the router's softmax probabilities of the chosen experts, not renormalised.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise SimcacheError(f"input file not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise SimcacheError(f"{path} is not a Parquet file ({str(exc).splitlines()[0]})") from None
    need = {"stream_idx", "layer", "token_id", "experts", "scores"}
    if not need <= set(table.column_names):
        raise SimcacheError(f"{path} is not the FLAME sample (needs columns {sorted(need)})")
    stream = table.column("stream_idx").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64) - 2
    exp = np.asarray(table.column("experts").combine_chunks().flatten().to_numpy()).reshape(-1, FLAME_TOP_K)
    scores = np.asarray(table.column("scores").combine_chunks().flatten().to_numpy()).reshape(-1, FLAME_TOP_K)
    window = stream // 512
    in_block = stream < 2048
    request = np.where(in_block, 0, window - 3)
    position = np.where(in_block, stream, stream % 512)
    return Trace.from_arrays(
        exp,
        request=request,
        position=position,
        layer=layer,
        num_experts=FLAME_EXPERTS,
        phase=np.ones(stream.shape[0], np.int8),
        weights=scores,
        token_id=table.column("token_id").to_numpy(),
        num_layers=FLAME_LAYERS,
        model="FLAME-MoE-290M (iteration 5473)",
        architecture="flame-moe (Megatron; 64 routed + 2 shared experts, top-6)",
        expert_bytes=FLAME_EXPERT_BYTES,
        expert_bytes_note="estimated from the published parameter counts: "
        "(1.3e9 - 290e6) / (8 layers x 58 unused experts) x 2 bytes (bf16)",
        dtype="bfloat16",
        capture="teacher-forced over the pretraining token stream (prefill-style routing)",
        corpus="FLAME-MoE pretraining stream, shard 0-0",
        weights_note="router softmax probability of each chosen expert over 64 experts, not renormalised",
        source="CMU-FLAME/FLAME-MoE-Traces (Apache-2.0), sample redistributed by "
        "Akash-N-Pai/DynaNDE-Simulator@f274466b; layers 2-9 only (10-26 in that repo are copies)",
        license="Apache-2.0",
    )
