"""Bring foreign routing traces into the simcache format (docs/design.md §14).

One entry point, :func:`import_sources`: one or more input paths of one format, detected from
the path where it can be; every format reader yields the same plain
:class:`~simcache.importers._records.Records` and :func:`~simcache.importers._records.assemble`
builds the trace (request ids in order of first appearance, layers from 0, missing records as
gap rows, ``on_gap``).

========================  =====================================================================
format                    input
========================  =====================================================================
``jsonl``, ``parquet``    a table, one row per (token, layer) or per token (:mod:`.table`);
                          MoE-PolicyLang's files are recognised; ``.gz`` is read as is
``sglang``                SGLang expert-distribution ``per_token`` dumps (``.pt``, :mod:`.sglang`)
``routed-experts``        per-request ``routed_experts`` arrays from vLLM / SGLang (:mod:`.routed`)
``llama-cpp``             llama.cpp ``moe-trace`` CSV (:mod:`.llamacpp`)
``flame``                 the FLAME-MoE-290M sample Parquet (:mod:`.flame`)
``flame-traces``          the FLAME-MoE-Traces folder layout (:mod:`.flame`)
========================  =====================================================================
"""

from __future__ import annotations

import json
from pathlib import Path

from simcache.errors import SimcacheError
from simcache.importers._records import ON_GAP, ImportReport, Records, assemble
from simcache.importers.flame import import_flame
from simcache.importers.table import FIELD_GUESSES
from simcache.trace import Trace

FORMATS = ("auto", "jsonl", "parquet", "sglang", "routed-experts", "llama-cpp", "flame", "flame-traces")
TABLE_FIELDS = ("request", "position", "layer", "experts", "weights", "token_id", "domain")
# options a format takes beside the common ones
FORMAT_OPTIONS = {"routed-experts": ("top_k", "layers"), "sglang": ("rank",), "flame-traces": ("iteration",)}

__all__ = ["FORMATS", "ON_GAP", "ImportReport", "Records", "assemble", "detect_format", "import_file",
           "import_flame", "import_sources", "FIELD_GUESSES"]


def detect_format(path: Path) -> str:
    """The format of ``path`` from its name, and where that is ambiguous, its first bytes."""
    path = Path(path)
    if not path.exists():
        raise SimcacheError(f"input not found: {path}")
    if path.is_dir():
        if (path / "samples").is_dir() and (path / "actives").is_dir():
            return "flame-traces"
        if any(path.glob("*.npy")) or any(path.glob("*.json")):
            return "routed-experts"
        raise SimcacheError(f"{path} is a folder that is neither the FLAME-MoE-Traces layout "
                            f"(samples/, actives/) nor per-request routed_experts files (.npy, .json)")
    name = path.name.lower()
    bare = name[:-3] if name.endswith(".gz") else name
    if bare.endswith(".pt"):
        return "sglang"
    if bare.endswith(".csv"):
        return "llama-cpp"
    if bare.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            names = set(pq.read_schema(path).names)
        except Exception:  # not Parquet: the table reader says so
            names = set()
        return "flame" if {"stream_idx", "contiguous_prefix", "scores"} <= names else "parquet"
    if _first_json(path).get("meta_info", {}).get("routed_experts") is not None:
        return "routed-experts"
    return "jsonl"


def _first_json(path: Path) -> dict:
    import pyarrow as pa

    try:
        with pa.input_stream(str(path), compression="detect") as f:
            head = f.read(1 << 20)
        rec = json.loads(head.split(b"\n", 1)[0])
    except (ValueError, OSError, pa.ArrowInvalid):
        return {}
    return rec if isinstance(rec, dict) else {}


def import_sources(paths, *, fmt: str = "auto", on_gap: str = "keep", num_experts: int | None = None,
                   num_layers: int | None = None, first_layer: int | None = None, model: str | None = None,
                   expert_bytes: int | None = None, **fields) -> tuple[Trace, ImportReport]:
    """Import one or more sources of one format into a :class:`Trace` and a report.

    Parameters
    ----------
    paths : path or list of paths
        Inputs, in the order their requests are numbered.
    fmt : str
        One of :data:`FORMATS`; ``auto`` detects it from the first path.
    on_gap : {"keep", "drop-token", "error"}
        A (token, layer) without a record: keep it as a gap row (no demand), drop the whole
        token, or refuse.
    num_experts, num_layers, first_layer : int, optional
        The model's shape where the source does not say it (default: from the ids seen).
        ``first_layer`` is the source's number for MoE layer 0 (default: the smallest seen).
    model, expert_bytes :
        Metadata.
    **fields
        Column names for table formats (``request`` may be ``"a,b"``, a composite key), and
        format options (see each reader).

    Examples
    --------
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "t.jsonl")
    >>> rows = [{"seq": s, "layer": l, "experts": [s % 3, 3]} for s in (5, 5, 9) for l in (0, 1)]
    >>> _ = open(p, "w").write("\\n".join(json.dumps(r) for r in rows))
    >>> t, report = import_sources([p], request="seq", num_experts=4)
    >>> t.num_requests, t.num_tokens, t.metadata["request_keys"]["values"]
    (2, 3, [[5], [9]])
    """
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    if not paths:
        raise SimcacheError("no input given")
    for p in paths:
        if not p.exists():
            raise SimcacheError(f"input not found: {p}")
    if fmt not in FORMATS:
        raise SimcacheError(f"unknown input format '{fmt}' ({', '.join(FORMATS)})")
    if fmt == "auto":
        found = [detect_format(p) for p in paths]
        if len(set(found)) > 1:
            raise SimcacheError("inputs of different formats in one import: " + ", ".join(
                f"{p.name} ({f})" for p, f in zip(paths, found)))
        fmt = found[0]
    table_fields = {k: fields.pop(k) for k in TABLE_FIELDS if fields.get(k) is not None}
    for k in TABLE_FIELDS:
        fields.pop(k, None)
    if table_fields and fmt not in ("jsonl", "parquet"):
        raise SimcacheError(f"--{', --'.join(table_fields)} name table columns; the {fmt} format has "
                            f"fixed fields")
    allowed = FORMAT_OPTIONS.get(fmt, ())
    extra = [k for k, v in fields.items() if v is not None and k not in allowed]
    if extra:
        raise SimcacheError(f"option {', '.join(extra)} does not apply to the {fmt} format")
    fields = {k: v for k, v in fields.items() if v is not None}
    meta = {"model": model, "expert_bytes": expert_bytes, "sources": [p.name for p in paths],
            "capture": f"imported from {fmt}: " + ", ".join(p.name for p in paths)}
    if fmt == "flame":
        if len(paths) > 1:
            raise SimcacheError("the FLAME sample is one file; import it alone")
        trace = import_flame(paths[0])
        return trace, ImportReport(records=trace.num_rows, notes=["FLAME-MoE-290M sample: layers 2..9 "
                                                                   "renumbered 0..7"])
    if fmt in ("jsonl", "parquet"):
        from simcache.importers.table import read_tables

        rec = read_tables(paths, fmt=fmt, **table_fields)
        header = rec.metadata.get("source_header", {})
        num_experts = num_experts or header.get("num_experts") or rec.metadata.get("router_softmax_width")
        num_layers = num_layers or header.get("num_layers")
        if header.get("model_name") and model is None:
            meta["model"] = header["model_name"]
    elif fmt == "sglang":
        from simcache.importers.sglang import read_dumps

        rec = read_dumps(paths, **fields)
    elif fmt == "routed-experts":
        from simcache.importers.routed import read_routed

        rec = read_routed(paths, **fields)
    elif fmt == "llama-cpp":
        from simcache.importers.llamacpp import read_csv

        rec = read_csv(paths, **fields)
    else:  # flame-traces
        from simcache.importers.flame import read_flame_traces

        if len(paths) > 1:
            raise SimcacheError("give one FLAME-MoE-Traces folder")
        rec = read_flame_traces(paths[0], **fields)
        num_experts = num_experts or rec.metadata.pop("num_experts", None)
    num_experts = num_experts or rec.metadata.pop("num_experts", None)
    num_layers = num_layers or rec.metadata.pop("num_layers", None)
    if "capture" in rec.metadata:  # the reader's own description of how the data was made
        meta["capture"] = f"{rec.metadata.pop('capture')}; imported from " + ", ".join(p.name for p in paths)
    first_layer = first_layer if first_layer is not None else rec.metadata.pop("first_layer", None)
    return assemble(rec, num_experts=num_experts, num_layers=num_layers, on_gap=on_gap,
                    first_layer=first_layer, **meta)


def import_file(path, *, fmt: str | None = None, **options) -> Trace:
    """Read one foreign trace file and convert it (the trace only; see :func:`import_sources`)."""
    trace, _ = import_sources([path], fmt=fmt or "auto", **options)
    return trace
