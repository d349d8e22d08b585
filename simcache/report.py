"""Plain-text tables and result files for the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from simcache._files import atomic_output, atomic_write_text
from simcache.errors import SimcacheError


def table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A fixed-width table; ``align`` has one 'l' or 'r' per column (default: first left).

    Floats get four significant digits below 1, three decimals below 100, one below 1e5 and
    none (with thousands separators) above; ``None`` is ``-``.

    >>> print(table(["a", "x"], [[1, 2.5], ["b", 0.012345], ["c", 123.45], ["d", 123456.0], ["e", None]]))
    a        x
    -  -------
    1    2.500
    b  0.01235
    c    123.5
    d  123,456
    e        -
    """
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(values):
        out = []
        for v, w, a in zip(values, widths, align):
            out.append(v.ljust(w) if a == "l" else v.rjust(w))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_results(records: list[dict], path) -> Path:
    """Results to ``.parquet``, ``.csv`` or ``.json`` (by suffix), atomically."""
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return atomic_write_text(path, json.dumps(records, indent=2) + "\n")
    if suffix not in (".parquet", ".csv"):
        raise SimcacheError(f"--out must end in .parquet, .csv or .json, got {path.name}")
    frame = pd.DataFrame.from_records(records)
    with atomic_output(path) as tmp:
        if suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
    return path
