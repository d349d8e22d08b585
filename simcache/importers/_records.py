"""What every format reader yields, and how records become a :class:`~simcache.trace.Trace`.

A reader turns its file into :class:`Records`: plain numpy columns, one entry per (token,
layer) record it found, in any order, with -1 padding where a token chose fewer experts.
:func:`assemble` does the rest once for every format: request ids in order of first
appearance, layers numbered from 0, one row for every (token, layer) with the missing ones
as gap rows (trace schema 1.1), and the ``--on-gap`` choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simcache.errors import SimcacheError
from simcache.trace import NO_EXPERT, Trace

ON_GAP = ("keep", "drop-token", "error")


@dataclass
class Records:
    """Routing records read from one or more sources, one entry per (token, layer).

    Attributes
    ----------
    request : int64 (n,)
        Request ids, already dense (0..R-1, in order of first appearance).
    position, layer : int64 (n,)
    experts : int64 (n, k)
        Expert ids, highest gate first, -1 padding after the real ids.
    weights : float32 (n, k) or None
    phase : int8 (n,) or None
        0 = prefill, 1 = decode (default all decode).
    token_id, step : int64 (n,) or None
    domain : object (n,) or None
        Labels.
    where : list of (source name, first record index)
        For messages that name the file a record came from.
    metadata : dict
        Passed into the trace metadata (model, request_keys, notes, ...).
    """

    request: np.ndarray
    position: np.ndarray
    layer: np.ndarray
    experts: np.ndarray
    weights: np.ndarray | None = None
    phase: np.ndarray | None = None
    token_id: np.ndarray | None = None
    step: np.ndarray | None = None
    domain: np.ndarray | None = None
    where: list[tuple[str, int]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def source_of(self, i: int) -> str:
        """'file, record j' for record i (j counts from 1 inside its file)."""
        name, start = "input", 0
        for src, first in self.where:
            if first <= i:
                name, start = src, first
        return f"{name}, record {i - start + 1}"


@dataclass
class ImportReport:
    """What an import did, for the one-line summary the command prints."""

    records: int = 0
    gap_rows: int = 0  # (token, layer) rows with no record, kept as gaps
    padded_rows: int = 0  # rows with fewer than top_k experts
    dropped_tokens: int = 0  # tokens removed by --on-gap drop-token
    dropped_rows: int = 0  # rows removed with them (records and gaps)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = list(self.notes)
        if self.dropped_tokens:
            out.append(f"on-gap drop-token: removed {self.dropped_tokens:,} tokens "
                       f"({self.dropped_rows:,} rows) that lacked a record at some layer")
        elif self.gap_rows:
            out.append(f"on-gap keep: {self.gap_rows:,} (token, layer) rows have no record and are "
                       f"kept as gaps (no demand)")
        else:
            out.append("no gaps: every token has a record at every layer")
        if self.padded_rows:
            out.append(f"{self.padded_rows:,} rows hold fewer than top-k experts (padded with -1)")
        return out


def assemble(rec: Records, *, num_experts: int | None = None, num_layers: int | None = None,
             on_gap: str = "keep", first_layer: int | None = None, **metadata) -> tuple[Trace, ImportReport]:
    """Build the trace from records (see the module docstring).

    ``first_layer`` is the number the source gives its first MoE layer (default: the
    smallest layer seen); layers are renumbered from 0 and the shift is reported.
    """
    if on_gap not in ON_GAP:
        raise SimcacheError(f"on-gap must be one of {', '.join(ON_GAP)}, got {on_gap!r}")
    report = ImportReport(records=int(rec.request.shape[0]))
    n = report.records
    if n == 0:
        raise SimcacheError("input has no routing records")
    layer = rec.layer
    lo = int(layer.min()) if first_layer is None else int(first_layer)
    if int(layer.min()) < lo:
        i = int(np.argmin(layer))
        raise SimcacheError(f"{rec.source_of(i)}: layer {int(layer[i])} is below the first MoE layer {lo}")
    if lo:
        layer = layer - lo
        report.notes.append(f"layers renumbered: source layer {lo} is MoE layer 0 "
                            f"(source layers {lo}..{lo + int(layer.max())})")
        metadata.setdefault("source_first_layer", lo)
    L = int(layer.max()) + 1 if num_layers is None else int(num_layers)
    if int(layer.max()) >= L:
        i = int(np.argmax(layer))
        raise SimcacheError(f"{rec.source_of(i)}: layer {int(layer[i]) + lo} is beyond the {L} MoE layers")
    experts = rec.experts
    k = experts.shape[1]
    if k == 0:
        raise SimcacheError("records hold no expert ids")
    E = int(experts.max()) + 1 if num_experts is None else int(num_experts)
    bad = np.flatnonzero((experts >= E).any(axis=1) | (experts < NO_EXPERT).any(axis=1))
    if bad.size:
        i = int(bad[0])
        row = experts[i]
        e = int(row[(row >= E) | (row < NO_EXPERT)][0])
        raise SimcacheError(f"{rec.source_of(i)}: expert id {e} is outside [0, {E}) (num_experts={E})")
    if (rec.position < 0).any():
        i = int(np.flatnonzero(rec.position < 0)[0])
        raise SimcacheError(f"{rec.source_of(i)}: negative position {int(rec.position[i])}")

    # tokens: distinct (request, position), sorted; records sorted into (token, layer)
    order = _order(rec.request, rec.position, layer)
    r, p, ly = (a if order is None else a[order] for a in (rec.request, rec.position, layer))
    if order is None:
        order = slice(None)
    same_token = (r[1:] == r[:-1]) & (p[1:] == p[:-1])
    twice = np.flatnonzero(same_token & (ly[1:] == ly[:-1]))
    if twice.size:
        i = int(np.arange(n)[order][twice[0] + 1])
        raise SimcacheError(
            f"{rec.source_of(i)}: token (request {int(r[twice[0]])}, position {int(p[twice[0]])}) "
            f"appears twice at layer {int(ly[twice[0]]) + lo}; if two files or keys reuse ids, "
            f"name every key column with --request A,B"
        )
    token_of = np.r_[0, np.cumsum(~same_token)]  # token index of each sorted record
    T = int(token_of[-1]) + 1
    slot = token_of * L + ly  # row of the full (token, layer) grid
    first = np.r_[0, np.flatnonzero(~same_token) + 1]  # first sorted record of each token
    t_req, t_pos = r[first], p[first]

    complete = T * L == n  # every (token, layer) has its record: no grid to fill

    def grid(values, fill, dtype, width=None):
        if complete:
            return np.ascontiguousarray(values[order], dtype=dtype)
        shape = (T * L,) if width is None else (T * L, width)
        out = np.full(shape, fill, dtype)
        out[slot] = values[order]
        return out

    full = grid(experts, NO_EXPERT, np.int32, k)
    weights = None if rec.weights is None else grid(rec.weights, 0.0, np.float32, k)

    def per_token(values, name):
        """A per-token column (phase, token id, step) checked equal over a token's records."""
        v = values[order]
        if (same_token & (v[1:] != v[:-1])).any():
            i = int(np.arange(n)[order][np.flatnonzero(same_token & (v[1:] != v[:-1]))[0] + 1])
            raise SimcacheError(f"{rec.source_of(i)}: {name} differs between layers of one token")
        return v[first]

    t_phase = np.ones(T, np.int8) if rec.phase is None else per_token(rec.phase, "phase").astype(np.int8)
    t_tok = None if rec.token_id is None else per_token(rec.token_id, "token id")
    t_step = None if rec.step is None else per_token(rec.step, "step")
    t_dom = None if rec.domain is None else rec.domain[order][first]

    gap = (full[:, 0] == NO_EXPERT).reshape(T, L)  # no record, or a record with no expert
    report.gap_rows = int(gap.sum())
    if report.gap_rows and on_gap == "error":
        t, l = (int(x[0]) for x in np.nonzero(gap))
        raise SimcacheError(
            f"token (request {int(t_req[t])}, position {int(t_pos[t])}) has no record at layer "
            f"{l + lo}; {report.gap_rows:,} (token, layer) records are missing in all "
            f"(--on-gap keep keeps them as gaps, drop-token drops those tokens)"
        )
    keep_tok = np.ones(T, np.bool_)
    if report.gap_rows and on_gap == "drop-token":
        keep_tok = ~gap.any(axis=1)
        report.dropped_tokens = int((~keep_tok).sum())
        report.dropped_rows = report.dropped_tokens * L
        report.gap_rows = 0
        if not keep_tok.any():
            raise SimcacheError("--on-gap drop-token would drop every token: each one lacks some layer")
    keep_row = np.repeat(keep_tok, L)
    full = full[keep_row]
    report.padded_rows = int(((full[:, -1] == NO_EXPERT) & (full[:, 0] != NO_EXPERT)).sum())
    # leading -1 inside a record (e.g. SGLang pads after the real ids only): check here so the
    # message names the source, not a row of the output
    inner = (full[:, :-1] == NO_EXPERT) & (full[:, 1:] != NO_EXPERT)
    if inner.any():
        g = int(np.flatnonzero(inner.any(axis=1))[0])
        raise SimcacheError(f"a record holds an expert id after a -1: {full[g].tolist()} "
                            f"(-1 may only pad the end of a record)")
    Tk = int(keep_tok.sum())

    def tok_rows(values):
        return np.repeat(values[keep_tok], L)

    meta = {**rec.metadata, **{k_: v for k_, v in metadata.items() if v is not None}}
    meta.setdefault("model", "unknown")
    trace = Trace.from_arrays(
        full,
        request=tok_rows(t_req),
        position=tok_rows(t_pos),
        layer=np.tile(np.arange(L, dtype=np.int64), Tk),
        num_experts=E,
        phase=tok_rows(t_phase),
        weights=None if weights is None else weights[keep_row],
        token_id=None if t_tok is None else tok_rows(t_tok),
        domain=None if t_dom is None else tok_rows(t_dom),
        step=None if t_step is None else tok_rows(t_step),
        num_layers=L,
        **meta,
    )
    return trace, report


def _order(request, position, layer):
    """The permutation that sorts records by (request, position, layer); None when they are
    sorted already (engines and captures write them so: no sort of ten million rows)."""
    r, p, l = request, position, layer
    if r.size < 2:
        return None
    step = (r[1:] > r[:-1]) | ((r[1:] == r[:-1]) & ((p[1:] > p[:-1]) | ((p[1:] == p[:-1]) & (l[1:] >= l[:-1]))))
    if step.all():
        return None
    return np.lexsort((l, p, r))


def first_appearance(*columns: np.ndarray) -> tuple[np.ndarray, list[list[Any]]]:
    """Dense ids for composite keys in order of first appearance, and each id's key values.

    >>> ids, keys = first_appearance(np.array(["b", "a", "b"], object), np.array([0, 0, 0]))
    >>> ids.tolist(), keys
    ([0, 1, 0], [['b', 0], ['a', 0]])
    """
    import pandas as pd

    n = columns[0].shape[0]
    combined = np.zeros(n, np.int64)
    uniques = []
    for col in columns:
        codes, uniq = pd.factorize(col, use_na_sentinel=False)
        combined = combined * (len(uniq) + 1) + codes
        uniques.append(uniq)
    ids, rep = pd.factorize(combined)
    # the key values of each id: from its first record
    firsts = np.zeros(len(rep), np.int64)
    firsts[ids[::-1]] = np.arange(n - 1, -1, -1)
    keys = [[_plain(col[i]) for col in columns] for i in firsts]
    return ids.astype(np.int64), keys


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    return v
