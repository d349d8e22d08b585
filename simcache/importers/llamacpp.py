"""llama.cpp ``moe-trace`` CSV: ``pos,layer,id_1,...,id_k``, one line per (token, MoE layer).

The layout is the one docs/design.md §14 gives: ``pos`` is the token position, negative for prompt
tokens (prefill); ``layer`` the transformer block (``blk.N``) whose ``ffn_moe_topk`` ids the
line holds; then the k chosen experts, highest gate first. No tool that writes this file was
found in the ggml-org/llama.cpp sources stored here (its MoE graph names the chosen ids
``ffn_moe_topk-N`` in ``src/llama-graph.cpp``, which an eval callback can print), so the layout
is taken from the design card, not confirmed from a writer. A header line is optional. Each
file is one request; tokens are numbered from 0 in ``pos`` order, so a prompt at ``-n..-1``
followed by generation at ``0..`` becomes positions ``0..`` with the prompt first. A block
number above 0 for the first MoE layer is renumbered from 0 (with a message).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simcache.errors import SimcacheError
from simcache.importers._records import Records


def read_csv(paths: list[Path]) -> Records:
    parts = {k: [] for k in ("request", "position", "layer", "experts", "phase")}
    where, start, width = [], 0, None
    for r, path in enumerate(paths):
        pos, layer, ids = _read(path)
        if width is not None and ids.shape[1] != width:
            raise SimcacheError(f"{path}: {ids.shape[1]} ids per line, {paths[0]} has {width}")
        width = ids.shape[1]
        order = np.unique(pos, return_inverse=True)[1]
        parts["request"].append(np.full(pos.size, r))
        parts["position"].append(order.astype(np.int64))
        parts["layer"].append(layer)
        parts["experts"].append(ids)
        parts["phase"].append((pos >= 0).astype(np.int8))
        where.append((path.name, start))
        start += pos.size
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return Records(request=cat["request"], position=cat["position"], layer=cat["layer"],
                   experts=cat["experts"], phase=cat["phase"], where=where,
                   metadata={"capture": "llama.cpp moe-trace CSV",
                             "request_keys": {"fields": ["file"], "values": [[p.name] for p in paths]}})


def _read(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    header = _first_line(path)
    has_header = header.split(",")[0].strip().lower() == "pos"
    try:
        table = pcsv.read_csv(
            pa.input_stream(str(path), compression="detect"),
            read_options=pcsv.ReadOptions(autogenerate_column_names=not has_header, block_size=16 << 20),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimcacheError(_locate(path, has_header) or f"{path}: not a moe-trace CSV "
                            f"({str(exc).strip().splitlines()[0]})") from None
    if table.num_columns < 3:
        raise SimcacheError(f"{path}: a moe-trace line is pos,layer,id_1..id_k (got {table.num_columns} fields)")
    cols = []
    for i in range(table.num_columns):
        col = table.column(i).combine_chunks()
        if col.null_count or not pa.types.is_integer(col.type):
            bad = _first_bad(col)
            raise SimcacheError(f"{path}, line {bad + 1 + has_header}: field {i + 1} is not an integer")
        cols.append(col.to_numpy().astype(np.int64))
    if table.num_rows == 0:
        raise SimcacheError(f"{path}: no records")
    return cols[0], cols[1], np.stack(cols[2:], axis=1)


def _first_line(path: Path) -> str:
    import pyarrow as pa

    try:
        with pa.input_stream(str(path), compression="detect") as f:
            return f.read(1 << 16).split(b"\n", 1)[0].decode("utf-8", "replace")
    except (OSError, pa.ArrowInvalid) as exc:
        raise SimcacheError(f"{path}: cannot read ({exc})") from None


def _locate(path: Path, has_header: bool) -> str | None:
    """The first line whose field count differs from the first record's, as a message."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        want = None
        for n, line in enumerate(f, 1):
            if n == 1 and has_header or not line.strip():
                continue
            fields = line.rstrip("\n").split(",")
            if want is None:
                want = len(fields)
            elif len(fields) != want:
                return (f"{path}, line {n}: {len(fields) - 2} expert ids, the first record has "
                        f"{want - 2} (pos,layer,id_1..id_k)")
    return None


def _first_bad(col) -> int:
    import pyarrow as pa

    if col.null_count:
        return int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
    values = col.to_pylist()
    for i, v in enumerate(values):
        try:
            int(v)
        except (TypeError, ValueError):
            return i
    return 0
