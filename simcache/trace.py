"""Routing traces: the Parquet format (schema version 1 and 1.1) and its in-memory form.

A trace holds one row per (request, position, MoE layer): the experts the router chose for
that token at that layer, highest gate first, and the gate weights the model applied. File
metadata (JSON under the key ``simcache``) names the model and its shape. Reading yields a
:class:`Trace`, a frozen dataclass of contiguous numpy columns; the simulator, analysis and
replay all start from it.

Version 1.1 (docs/design.md §14) adds *missing records*: an expert id of -1 is "no expert here". A row
whose experts are all -1 is a **gap** (the profiler lost this token at this layer); -1 after
the real ids is **padding** (this token chose fewer than ``top_k`` experts). A file is written
as 1.1 only when it holds a -1; version 1 files read as before.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from simcache._files import check_input, claim
from simcache.errors import SimcacheError

SCHEMA_VERSION = 1
SCHEMA_VERSION_GAPS = 1.1  # -1 = no record (gaps, padding); written only when a -1 is present
READABLE_VERSIONS = (SCHEMA_VERSION, SCHEMA_VERSION_GAPS)
NO_EXPERT = -1
METADATA_KEY = b"simcache"
ROW_GROUP_ROWS = 1 << 20
INT16_MAX = int(np.iinfo(np.int16).max)
INT32_MAX = int(np.iinfo(np.int32).max)


# ---- the schema: one declaration of every column and metadata field ----------------------


@dataclass(frozen=True)
class Column:
    """One trace column: its type in memory and in the file, and the values it may hold.

    ``kind`` is ``"int"``, ``"float"`` or ``"label"`` (strings, stored as a dictionary with
    int16 codes; -1 in memory = no label). ``per_expert`` columns hold a list per row (an
    Arrow ``fixed_size_list``) of ``width`` values: ``"top_k"``, or ``"lookahead"`` (the
    look-ahead columns' own width, 2 x top_k as capture writes them). Valid values lie in ``[lo, hi]``, where ``hi`` may
    instead name a limit (``num_layers``, ``num_experts``, ``domains``) that values stay below.
    """

    name: str
    dtype: str
    required: bool
    lo: int | None = None
    hi: int | str | None = None
    kind: str = "int"
    per_expert: bool = False
    what: str = ""
    width: str = "top_k"

    def arrow_type(self, widths: dict):
        import pyarrow as pa

        if self.kind == "label":
            return pa.dictionary(pa.int16(), pa.string())
        value = pa.from_numpy_dtype(np.dtype(self.dtype))
        return pa.list_(value, widths[self.width]) if self.per_expert else value

    def bounds(self, limits: dict) -> tuple[int | None, int | None]:
        """Inclusive (lo, hi) under ``limits`` (the metadata plus ``domains``)."""
        hi = self.hi
        if isinstance(hi, str):
            hi = int(limits[hi]) - 1
        return self.lo, hi

    def check(self, values: np.ndarray, limits: dict) -> None:
        """Raise :class:`SimcacheError` unless every value is valid. Works on any integer width,
        so a reader checks before narrowing to ``dtype`` (a narrowed 65536 + l reads as l)."""
        if self.name == "experts":
            check_expert_ids(values, int(limits["num_experts"]), limits.get("missing_ok", True))
            return
        if not values.size:
            return
        if self.kind == "float":
            if not np.isfinite(values).all():
                raise SimcacheError(f"column '{self.name}' holds NaN or infinite values")
            return
        lo, hi = self.bounds(limits)
        vmin, vmax = values.min(), values.max()
        if (lo is not None and vmin < lo) or (hi is not None and vmax > hi):
            bad = vmin if lo is not None and vmin < lo else vmax
            where = f"[{lo}, {hi}]"
            why = f" ({self.what})" if self.what else ""
            if isinstance(self.hi, str):
                why = f" ({self.hi}={limits[self.hi]})"
            raise SimcacheError(f"column '{self.name}' has value {int(bad)} outside {where}{why}")


COLUMNS = (
    Column("request", "int32", True, 0, INT32_MAX, what="sequence id"),
    Column("position", "int32", True, 0, INT32_MAX, what="token index in its sequence"),
    Column("phase", "int8", True, 0, 1, what="0 = prefill, 1 = decode"),
    Column("layer", "int16", True, 0, "num_layers"),
    Column("experts", "int16", True, 0, "num_experts", per_expert=True),
    Column("weights", "float32", False, kind="float", per_expert=True),
    Column("token_id", "int32", False, 0, INT32_MAX, what="token id"),
    Column("domain", "int16", False, -1, "domains", kind="label"),
    Column("step", "int32", False, 0, INT32_MAX, what="recorded forward pass"),
    Column("lookahead", "int16", False, -1, "num_experts", per_expert=True, width="lookahead",
           what="router l+1's choice on layer l's input; -1 = none"),
    Column("lookahead_scores", "float32", False, kind="float", per_expert=True, width="lookahead"),
)
COLUMN = {c.name: c for c in COLUMNS}


@dataclass(frozen=True)
class Field:
    """One metadata field with an integer value in [lo, hi] (``hi`` may name another field)."""

    name: str
    required: bool
    lo: int
    hi: int | str


# Metadata every trace carries, and the optional numbers simcache uses; the rest (model,
# architecture, dtype, capture, corpus, tool_version, ...) is passed through unchanged.
FIELDS = (
    Field("num_layers", True, 1, INT16_MAX),
    Field("num_experts", True, 1, INT16_MAX),
    Field("top_k", True, 1, "num_experts"),
    Field("expert_bytes", False, 1, 2**53),
)
REQUIRED_METADATA = tuple(f.name for f in FIELDS if f.required)


def check_metadata(meta) -> dict[str, Any]:
    """The metadata with its numeric fields checked (and as plain ints); raises
    :class:`SimcacheError` naming the first bad field."""
    if not isinstance(meta, dict):
        raise SimcacheError(f"trace metadata must be a JSON object, got {type(meta).__name__}")
    out = dict(meta)
    for f in FIELDS:
        value = meta.get(f.name)
        if value is None:
            if f.required:
                raise SimcacheError(f"trace metadata lacks '{f.name}'")
            out.pop(f.name, None)
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise SimcacheError(f"trace metadata '{f.name}' must be an integer, got {value!r:.40}")
        hi = out[f.hi] if isinstance(f.hi, str) else f.hi
        if not f.lo <= value <= hi:
            limit = f"{f.hi}={hi}" if isinstance(f.hi, str) else str(hi)
            raise SimcacheError(f"trace metadata '{f.name}'={value} is outside [{f.lo}, {limit}]")
        out[f.name] = int(value)
    return out


def check_expert_ids(experts: np.ndarray, num_experts: int, missing_ok: bool = True) -> None:
    """Every expert id in [0, num_experts), or -1 (no record, padding: schema 1.1) when
    ``missing_ok``: the one place that decides which ids are valid."""
    if experts.size and not np.issubdtype(experts.dtype, np.integer):
        raise SimcacheError("experts must hold integer ids")
    if experts.size:
        lo, hi = int(experts.min()), int(experts.max())
        if lo < (NO_EXPERT if missing_ok else 0) or hi >= num_experts:
            bad = hi if hi >= num_experts else lo
            raise SimcacheError(f"expert id {bad} is outside [0, {num_experts}) (num_experts={num_experts})")


@dataclass(frozen=True, eq=False)
class Trace:
    """A routing trace in memory: contiguous numpy columns plus metadata.

    Rows are sorted by (request, position, layer) and every token has exactly one row per
    MoE layer, so ``experts.reshape(num_tokens, num_layers, top_k)`` is the token-major view
    (see :meth:`token_experts`).

    Attributes
    ----------
    request, position : int32 arrays, shape (rows,)
        Sequence id and token index inside the sequence.
    phase : int8 array, shape (rows,)
        0 = prefill (prompt), 1 = decode (generated or teacher-forced continuation).
    layer : int16 array, shape (rows,)
        MoE layer index, 0-based over MoE layers only.
    experts : int16 array, shape (rows, top_k)
        Chosen experts, highest gate first, distinct within a row.
    weights : float32 array, shape (rows, top_k), or None
        Gate weights the model applied to those experts.
    token_id : int32 array, shape (rows,), or None
    domain : int16 array, shape (rows,), or None
        Codes into ``domains`` (-1 = no label).
    domains : tuple of str
    step : int32 array, shape (rows,), or None
        The engine forward pass that computed the token (SGLang dumps), same for all its
        layers; ``Workload(trace, batch="recorded")`` replays these passes as the steps.
    lookahead : int16 array, shape (rows, 2 * top_k), or None
        Experts that router l+1 picks for layer l's MoE input, highest score first (-1 at
        the last layer); ``lookahead_scores`` holds their scores (docs/design.md §12).
    metadata : dict
        At least ``num_layers``, ``num_experts``, ``top_k``; see docs/design.md §2.

    An expert id of -1 means no expert (schema 1.1): a row of all -1 is a gap, -1 after real
    ids is padding; see :attr:`gap_rows` and :attr:`padded_rows`.
    """

    request: np.ndarray
    position: np.ndarray
    phase: np.ndarray
    layer: np.ndarray
    experts: np.ndarray
    weights: np.ndarray | None = None
    token_id: np.ndarray | None = None
    domain: np.ndarray | None = None
    step: np.ndarray | None = None
    lookahead: np.ndarray | None = None
    lookahead_scores: np.ndarray | None = None
    domains: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        experts,
        request,
        position,
        layer,
        *,
        num_experts: int,
        phase=None,
        weights=None,
        token_id=None,
        domain=None,
        step=None,
        **metadata,
    ) -> "Trace":
        """Build and validate a trace from plain arrays.

        Parameters
        ----------
        experts : int array, shape (rows, k)
            Chosen experts per row, highest gate first.
        request, position, layer : int arrays, shape (rows,)
        num_experts : int
            Experts per MoE layer (E); every id must be below it.
        phase : int array, optional
            0 = prefill, 1 = decode; default all decode.
        weights : float array, shape (rows, k), optional
        token_id : int array, optional
        domain : sequence of str (one label per row), optional
        step : int array, optional
            The recorded forward pass of each row (see :class:`Trace`).
        **metadata
            Stored in the file metadata (``model``, ``expert_bytes``, ``num_layers``, ...).
            ``num_layers`` defaults to ``max(layer) + 1``.

        Rows may come in any order; they are sorted by (request, position, layer).

        Examples
        --------
        >>> import numpy as np, simcache
        >>> t = simcache.Trace.from_arrays(np.array([[0, 1], [2, 3], [1, 0], [3, 2]]),
        ...     request=[0, 0, 0, 0], position=[0, 0, 1, 1], layer=[0, 1, 0, 1], num_experts=4)
        >>> t.num_tokens, t.num_layers, t.top_k
        (2, 2, 2)
        """
        experts = np.asarray(experts)
        if experts.ndim != 2:
            raise SimcacheError(f"experts must have shape (rows, k), got {experts.shape}")
        rows, k = experts.shape
        given = dict(request=request, position=position, phase=phase, layer=layer, experts=experts,
                     weights=weights, token_id=token_id, step=step)
        if phase is None:
            given["phase"] = np.ones(rows, np.int8)
        native = {name: _given_column(COLUMN[name], v, rows, k) for name, v in given.items() if v is not None}
        domains: tuple[str, ...] = ()
        if domain is not None:
            labels = np.asarray(domain, dtype=object)
            if labels.shape != (rows,):
                raise SimcacheError(f"domain must have one label per row ({rows})")
            present = sorted({str(x) for x in labels if x is not None})
            lookup = {name: i for i, name in enumerate(present)}
            native["domain"] = np.array([-1 if x is None else lookup[str(x)] for x in labels], np.int64)
            domains = tuple(present)
        if rows and "num_layers" not in metadata:
            metadata["num_layers"] = int(native["layer"].max()) + 1
        metadata["num_experts"] = num_experts
        metadata["top_k"] = k
        meta = check_metadata(metadata)
        limits = {**meta, "domains": len(domains)}
        for name, values in native.items():
            COLUMN[name].check(values, limits)  # at native width, before narrowing
        trace = cls(
            **{name: np.ascontiguousarray(v, dtype=COLUMN[name].dtype) for name, v in native.items()},
            domains=domains,
            metadata=meta,
        )
        return _sorted(trace).validated()

    def validated(self) -> "Trace":
        """Check the invariants of docs/design.md §2; raise :class:`SimcacheError` naming the first
        one broken. Returns self."""
        meta = check_metadata(self.metadata)
        L, k = meta["num_layers"], meta["top_k"]
        if self.request is None or self.request.shape[0] == 0:
            raise SimcacheError("trace is empty (no rows)")
        rows = self.request.shape[0]
        limits = {**meta, "domains": len(self.domains)}
        widths = _widths(self)
        if self.lookahead is None and self.lookahead_scores is not None:
            raise SimcacheError("lookahead_scores needs the lookahead column")
        for col in COLUMNS:
            values = getattr(self, col.name)
            if values is None:
                if col.required:
                    raise SimcacheError(f"trace lacks column '{col.name}'")
                continue
            shape = (rows, widths[col.width]) if col.per_expert else (rows,)
            if values.shape != shape:
                if col.per_expert and values.ndim == 2 and values.shape[0] == rows:
                    raise SimcacheError(
                        f"{col.name} have {values.shape[1]} per row but metadata says top_k={k}"
                    )
                raise SimcacheError(f"column '{col.name}' has shape {values.shape}, expected {shape}")
            if values.dtype != np.dtype(col.dtype):
                raise SimcacheError(f"column '{col.name}' must be {col.dtype} in memory, got {values.dtype}")
            col.check(values, limits)
        if self.has_missing and k > 1:
            missing = self.experts == NO_EXPERT
            after = np.flatnonzero((missing[:, :-1] & ~missing[:, 1:]).any(axis=1))
            if after.size:
                r = int(after[0])
                raise SimcacheError(
                    f"row {r} (request {self.request[r]}, position {self.position[r]}, layer "
                    f"{self.layer[r]}) has an expert after a -1: {self.experts[r].tolist()} "
                    f"(-1 may only pad the end of a row)"
                )
        if k > 1:
            repeats = np.zeros(rows, np.bool_)
            for a in range(k):
                for b in range(a + 1, k):
                    repeats |= (self.experts[:, a] == self.experts[:, b]) & (self.experts[:, a] >= 0)
            dup = np.flatnonzero(repeats)
            if dup.size:
                r = int(dup[0])
                raise SimcacheError(
                    f"row {r} (request {self.request[r]}, position {self.position[r]}, layer "
                    f"{self.layer[r]}) repeats an expert: {self.experts[r].tolist()}"
                )
        r, p, ly = self.request, self.position, self.layer
        twice = np.flatnonzero((r[1:] == r[:-1]) & (p[1:] == p[:-1]) & (ly[1:] == ly[:-1]))
        if twice.size:
            i = int(twice[0])
            raise SimcacheError(f"token (request {r[i]}, position {p[i]}) appears twice at layer {ly[i]}")
        if rows % L:
            raise SimcacheError(f"{rows} rows is not a whole number of tokens x {L} layers")
        blocks = self.layer.reshape(-1, L)
        if not (blocks == np.arange(L, dtype=np.int16)).all():
            b = int(np.nonzero((blocks != np.arange(L)).any(axis=1))[0][0])
            raise SimcacheError(
                f"token (request {self.request[b * L]}, position {self.position[b * L]}) does "
                f"not have exactly one row for each of the {L} layers"
            )
        req = self.request.reshape(-1, L)
        pos = self.position.reshape(-1, L)
        if not ((req == req[:, :1]).all() and (pos == pos[:, :1]).all()):
            raise SimcacheError(f"some token is missing layers: rows are not in blocks of {L} layers")
        tr = req[:, 0]
        same = tr[1:] == tr[:-1]
        ph = self.phase.reshape(-1, L)
        if not (ph == ph[:, :1]).all():
            raise SimcacheError("phase differs between layers of one token")
        tph = ph[:, 0]
        if (same & (tph[1:] < tph[:-1])).any():
            i = int(np.nonzero(same & (tph[1:] < tph[:-1]))[0][0])
            raise SimcacheError(f"request {tr[i]} has a prefill token after a decode token")
        if self.step is not None:
            st = self.step.reshape(-1, L)
            if not (st == st[:, :1]).all():
                raise SimcacheError("step differs between layers of one token")
        return self

    # ---- shape --------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self.metadata["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.metadata["top_k"])

    @property
    def num_rows(self) -> int:
        return int(self.request.shape[0])

    @property
    def num_tokens(self) -> int:
        return self.num_rows // self.num_layers

    @property
    def num_requests(self) -> int:
        return int(np.unique(self.request).size)

    @property
    def expert_bytes(self) -> int | None:
        value = self.metadata.get("expert_bytes")
        return None if value is None else int(value)

    @property
    def model(self) -> str:
        return str(self.metadata.get("model", "unknown"))

    # ---- token-major views --------------------------------------------------------------

    def token_experts(self) -> np.ndarray:
        """Experts as (tokens, layers, k): a view, no copy."""
        return self.experts.reshape(self.num_tokens, self.num_layers, self.top_k)

    def token_request(self) -> np.ndarray:
        """Request id of each token, shape (tokens,)."""
        return self.request[:: self.num_layers]

    def token_position(self) -> np.ndarray:
        return self.position[:: self.num_layers]

    def token_phase(self) -> np.ndarray:
        return self.phase[:: self.num_layers]

    def token_domain(self) -> np.ndarray | None:
        return None if self.domain is None else self.domain[:: self.num_layers]

    def select_requests(self, requests: Iterable[int]) -> "Trace":
        """The sub-trace holding only the given request ids (order kept)."""
        keep = np.isin(self.request, np.asarray(list(requests), dtype=np.int32))
        return self.select_rows(keep)

    def select_rows(self, keep: np.ndarray) -> "Trace":
        """The sub-trace of whole tokens selected by a boolean row mask."""

        return dataclasses.replace(self, **_take_rows(self, keep)).validated()

    @property
    def has_missing(self) -> bool:
        """True when some expert id is -1 (a gap or padding: schema 1.1)."""
        return bool(self.experts.size) and int(self.experts.min()) == NO_EXPERT

    @property
    def gap_rows(self) -> np.ndarray:
        """Rows with no record at all (every expert -1), a boolean mask (rows,)."""
        return self.experts[:, 0] == NO_EXPERT

    @property
    def padded_rows(self) -> np.ndarray:
        """Rows with some but not all experts -1 (fewer than top_k chosen), mask (rows,)."""
        return (self.experts[:, -1] == NO_EXPERT) & (self.experts[:, 0] != NO_EXPERT)

    def summary(self) -> dict[str, Any]:
        """Shape, size, gaps and expert load balance (max / mean expert use per layer)."""
        L, E = self.num_layers, self.num_experts
        counts = np.zeros((L, E), np.int64)
        ids = self.experts.ravel()
        real = ids >= 0
        np.add.at(counts, (np.repeat(self.layer, self.top_k)[real], ids[real]), 1)
        mean = counts.mean(axis=1)
        balance = counts.max(axis=1) / np.where(mean > 0, mean, 1)
        phase = self.token_phase()
        out = {
            "model": self.model,
            "architecture": self.metadata.get("architecture", "unknown"),
            "num_layers": L,
            "num_experts": E,
            "top_k": self.top_k,
            "requests": self.num_requests,
            "tokens": self.num_tokens,
            "prefill_tokens": int((phase == 0).sum()),
            "decode_tokens": int((phase == 1).sum()),
            "rows": self.num_rows,
            "gap_rows": int(self.gap_rows.sum()),
            "padded_rows": int(self.padded_rows.sum()),
            "expert_bytes": self.expert_bytes,
            "load_max_over_mean_min": float(balance.min()),
            "load_max_over_mean_mean": float(balance.mean()),
            "load_max_over_mean_max": float(balance.max()),
            "unused_experts_per_layer_max": int((counts == 0).sum(axis=1).max()),
            "domains": list(self.domains),
        }
        return out


# ---- reading and writing ----------------------------------------------------------------


def read_trace(path) -> Trace:
    """Read a simcache trace (Parquet, schema version 1 or 1.1) and validate it.

    Raises :class:`SimcacheError` with a one-line message when the file is missing or not a
    regular file, not Parquet, lacks simcache metadata or holds bad metadata, has missing or
    mistyped columns, nulls, or a value outside its column's range (:data:`COLUMNS`), or
    breaks an invariant.
    """
    import pyarrow as pa

    path = check_input(path, "trace file")
    # Arrow's default pool (mimalloc) keeps what it frees, so each column read would stay
    # resident beside the numpy arrays made from it; the system allocator gives it back
    # (peak RSS of a 30 M-access read: 915 -> 721 MB)
    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        return _read(path)
    finally:
        pa.set_memory_pool(pool)


def _read(path) -> Trace:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise SimcacheError(f"{path} is not a Parquet file ({_first_line(exc)})") from None
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SimcacheError(
            f"{path} has no simcache metadata; convert foreign traces with 'simcache import'"
        )
    try:
        meta = json.loads(raw)
    except ValueError:
        raise SimcacheError(f"{path}: simcache metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise SimcacheError(f"{path}: simcache metadata must be a JSON object, got {type(meta).__name__}")
    version = meta.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise SimcacheError(
            f"{path}: trace schema version {version!r:.40} is not supported (expected "
            f"{' or '.join(map(str, READABLE_VERSIONS))})"
        )
    try:
        meta = check_metadata({k_: v for k_, v in meta.items() if k_ != "schema_version"})
        k = meta["top_k"]
        schema = pf.schema_arrow
        present = [c for c in COLUMNS if schema.get_field_index(c.name) >= 0]
        widths = {"top_k": k, "lookahead": None}
        if schema.get_field_index("lookahead") >= 0:
            ftype = schema.field("lookahead").type
            widths["lookahead"] = ftype.list_size if hasattr(ftype, "list_size") else None
        for col in COLUMNS:
            i = schema.get_field_index(col.name)
            if i < 0 and col.required:
                raise SimcacheError(f"missing column '{col.name}'")
            if i >= 0:
                _check_arrow_type(col, schema.field(i).type, widths)
        if pf.metadata.num_rows == 0:
            raise SimcacheError("trace is empty (no rows)")
        limits = dict(meta, missing_ok=version == SCHEMA_VERSION_GAPS)
        columns: dict[str, Any] = {}
        domains: tuple[str, ...] = ()
        for col in present:
            # one column at a time, so Arrow's copy of the file never sits beside all of ours
            try:
                arr = pf.read(columns=[col.name]).column(0).combine_chunks()
            except (pa.ArrowException, OSError) as exc:
                raise SimcacheError(f"cannot read column '{col.name}' ({_first_line(exc)})") from None
            if col.kind == "label":
                values, domains = _labels(arr)
                limits["domains"] = len(domains)
            else:
                values = _values(col, arr, widths[col.width])
            col.check(values, limits)  # at the file's width, before narrowing
            columns[col.name] = np.ascontiguousarray(values, dtype=col.dtype)
        return _sorted(Trace(**columns, domains=domains, metadata=meta)).validated()
    except SimcacheError as exc:
        raise SimcacheError(f"{path}: {exc}") from None


def _check_arrow_type(col: Column, ftype, widths: dict) -> None:
    import pyarrow as pa

    name = col.name
    if col.kind == "label":
        if pa.types.is_dictionary(ftype):
            ftype = ftype.value_type
        if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
            raise SimcacheError(f"column '{name}' must hold string labels, got {ftype}")
        return
    if col.per_expert:
        if not pa.types.is_fixed_size_list(ftype):
            raise SimcacheError(f"column '{name}' must be fixed_size_list, got {ftype}")
        k = widths[col.width]
        if ftype.list_size != k:
            what = "top_k" if col.width == "top_k" else "the lookahead column's width"
            raise SimcacheError(f"column '{name}' has {ftype.list_size} entries per row but {what}={k}")
        ftype = ftype.value_type
    if col.kind == "int" and not pa.types.is_integer(ftype):
        raise SimcacheError(f"column '{name}' must be an integer, got {ftype}")
    if col.kind == "float" and not pa.types.is_floating(ftype):
        raise SimcacheError(f"column '{name}' must hold floating-point numbers, got {ftype}")


def _values(col: Column, arr, k: int) -> np.ndarray:
    """A numeric column as numpy at its stored width; nulls are refused (a null read through
    numpy becomes an arbitrary number)."""
    if arr.null_count:
        raise SimcacheError(f"column '{col.name}' has {arr.null_count} null rows")
    if not col.per_expert:
        return arr.to_numpy(zero_copy_only=False)
    flat = arr.flatten()
    if flat.null_count:
        raise SimcacheError(f"column '{col.name}' has null entries")
    return flat.to_numpy(zero_copy_only=False).reshape(-1, k)


def _labels(arr) -> tuple[np.ndarray, tuple[str, ...]]:
    """Dictionary codes (null = -1) and the label table of a string or dictionary column."""
    import pyarrow as pa

    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    labels = arr.dictionary.to_pylist()
    if any(x is None for x in labels) or len(set(labels)) != len(labels):
        raise SimcacheError("column 'domain' has a null or repeated entry in its label table")
    if len(labels) > INT16_MAX:
        raise SimcacheError(f"column 'domain' has {len(labels)} labels; at most {INT16_MAX} fit")
    codes = arr.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    return codes, tuple(labels)


class TraceWriter:
    """Write a trace in row groups to a temporary file; :meth:`close` renames it into place.

    Capture streams rows through this so memory stays bounded and an interrupted run leaves
    no file at ``path`` (only the temporary, which is removed on error, or by the next write
    to ``path`` after a kill). Columns and their types come from :data:`COLUMNS`; values are
    range-checked before they are narrowed.

    Examples
    --------
    >>> import numpy as np, tempfile, os, simcache
    >>> from simcache.trace import TraceWriter
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "t.parquet")
    >>> with TraceWriter(p, num_layers=1, num_experts=4, top_k=1) as w:
    ...     w.write(request=[0, 0], position=[0, 1], phase=[1, 1], layer=[0, 0], experts=[[2], [3]])
    >>> simcache.read_trace(p).num_tokens
    2
    """

    def __init__(self, path, *, overwrite: bool = True, missing: bool = False, inputs=(), **metadata):
        """``missing=True`` allows -1 ids (gaps, padding) and writes schema 1.1."""
        import pyarrow as pa

        metadata.pop("schema_version", None)
        self.metadata = check_metadata(metadata)
        self.k = self.metadata["top_k"]
        self.missing = bool(missing)
        version = SCHEMA_VERSION_GAPS if self.missing else SCHEMA_VERSION
        self.metadata = {"schema_version": version, **self.metadata}
        self.metadata.setdefault("tool_version", _tool_version())
        self.output = claim(path, overwrite, inputs, suffixes=(".parquet",))
        self.path = self.output.path
        self._writer = None
        self._present: tuple[str, ...] | None = None
        self.rows = 0
        self._pending: list = []
        self._pending_rows = 0
        self._pa = pa

    def _schema(self, present, widths):
        pa = self._pa
        fields = [pa.field(name, COLUMN[name].arrow_type(widths), nullable=COLUMN[name].kind == "label")
                  for name in present]
        meta = {METADATA_KEY: json.dumps(self.metadata, sort_keys=True).encode()}
        return pa.schema(fields, metadata=meta)

    def write(self, **columns):
        """Append rows: one array per column of :data:`COLUMNS` (``experts`` and ``weights``
        of shape (rows, top_k); ``domain`` a sequence of labels, str or None)."""
        import pyarrow.parquet as pq

        pa = self._pa
        unknown = sorted(set(columns) - set(COLUMN))
        if unknown:
            raise SimcacheError(f"unknown trace column '{unknown[0]}'")
        present = tuple(c.name for c in COLUMNS if columns.get(c.name) is not None)
        for col in COLUMNS:
            if col.required and col.name not in present:
                raise SimcacheError(f"every batch needs column '{col.name}'")
        n = np.asarray(columns["experts"]).reshape(-1, self.k).shape[0]
        if n == 0:
            return
        if "lookahead_scores" in present and "lookahead" not in present:
            raise SimcacheError("lookahead_scores needs the lookahead column")
        widths = {"top_k": self.k, "lookahead": None}
        if "lookahead" in present:
            widths["lookahead"] = np.asarray(columns["lookahead"]).reshape(n, -1).shape[1]
        limits = dict(self.metadata, missing_ok=self.missing)
        arrays = []
        for name in present:
            col = COLUMN[name]
            if col.kind == "label":
                labels = list(columns[name])
                if len(labels) != n:
                    raise SimcacheError(f"column '{name}' has {len(labels)} rows, experts {n}")
                arrays.append(pa.array(labels, pa.string()).dictionary_encode().cast(col.arrow_type(widths)))
                continue
            values = np.asarray(columns[name])
            width = widths[col.width]
            values = values.reshape(-1, width) if col.per_expert else values
            if values.shape[0] != n or (not col.per_expert and values.ndim != 1):
                raise SimcacheError(f"column '{name}' has shape {values.shape}, experts {n} rows")
            if name == "experts" and not self.missing and values.size and int(values.min()) < 0:
                raise SimcacheError("expert id -1 (no record) in a trace written without missing=True")
            col.check(values, limits)
            values = np.ascontiguousarray(values, dtype=col.dtype)
            if col.per_expert:
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), width))
            else:
                arrays.append(pa.array(values))
        if self._writer is None:
            self._present = present
            self._writer = pq.ParquetWriter(self.output.tmp, self._schema(present, widths), compression="zstd")
        elif present != self._present:
            raise SimcacheError("every batch written to one trace must have the same columns")
        self._pending.append(pa.Table.from_arrays(arrays, schema=self._writer.schema))
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self):
        """Write what is buffered as whole row groups: many small batches in one group
        compress better (a capture's per-batch groups were 35% larger)."""
        if self._pending:
            self._writer.write_table(self._pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
            self._pending, self._pending_rows = [], 0

    def close(self):
        """Finish the file and move it into place. An empty trace is an error."""
        if self._writer is None:
            self.abort()
            raise SimcacheError("nothing was written: the trace would be empty")
        self._flush()
        self._writer.close()
        self._writer = None
        self.output.commit()

    def abort(self):
        """Drop the temporary file; ``path`` is left as it was."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.output.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_trace(trace: Trace, path, *, overwrite: bool = True, inputs=()) -> Path:
    """Write ``trace`` to ``path`` (Parquet, zstd), atomically: temporary name, then rename.
    ``inputs`` are files ``path`` must not be (the files the trace was made from)."""
    columns = {c.name: getattr(trace, c.name) for c in COLUMNS if getattr(trace, c.name) is not None}
    if "domain" in columns:
        names = np.array(list(trace.domains) + [None], dtype=object)
        columns["domain"] = names[np.where(trace.domain < 0, len(trace.domains), trace.domain)]
    with TraceWriter(path, overwrite=overwrite, missing=trace.has_missing, inputs=inputs,
                     **trace.metadata) as writer:
        for lo in range(0, trace.num_rows, ROW_GROUP_ROWS):
            writer.write(**{name: values[lo : lo + ROW_GROUP_ROWS] for name, values in columns.items()})
    return Path(path)

# ---- helpers ----------------------------------------------------------------------------


def _given_column(col: Column, values, rows: int, k: int) -> np.ndarray:
    """``values`` for column ``col`` at their own width, with shape and type checked: whole
    floats pass as integers, fractions do not (2.9 is no expert id)."""
    a = np.asarray(values)
    shape = (rows, k) if col.per_expert else (rows,)
    if a.shape != shape:
        if col.per_expert:
            raise SimcacheError(f"{col.name} shape {a.shape} does not match experts shape {shape}")
        raise SimcacheError(f"{col.name} must have shape {shape}, got {a.shape}")
    numeric = np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
    if a.dtype == np.bool_ or not numeric:
        raise SimcacheError(f"{col.name} must hold {'numbers' if col.kind == 'float' else 'integers'}")
    if col.kind == "int" and not np.issubdtype(a.dtype, np.integer):
        if not (np.isfinite(a).all() and (a == np.round(a)).all()):
            raise SimcacheError(f"{col.name} must hold integers")
    return a


def _widths(trace: Trace) -> dict:
    """The list widths of a trace's per-expert columns."""
    la = trace.lookahead
    return {"top_k": trace.top_k, "lookahead": None if la is None or la.ndim != 2 else la.shape[1]}


def _take_rows(trace: Trace, rows) -> dict[str, np.ndarray | None]:
    """Every column of ``trace`` indexed by ``rows`` (a mask or an order)."""
    out = {}
    for col in COLUMNS:
        values = getattr(trace, col.name)
        out[col.name] = None if values is None else np.ascontiguousarray(values[rows])
    return out

def _sorted(trace: Trace) -> Trace:
    """Rows in (request, position, layer) order; returns the same object when already so."""
    r, p, l = trace.request, trace.position, trace.layer
    n = r.shape[0]
    if n < 2:
        return trace
    if _in_order(r, p, l):
        return trace
    order = np.lexsort((l, p, r))
    return dataclasses.replace(trace, **_take_rows(trace, order))


def _in_order(r, p, l, chunk: int = 1 << 20) -> bool:
    """Whether rows are in (request, position, layer) order, checked a chunk of rows at a time
    (whole-column comparisons held five temporaries of the column's length: 190 MB on a
    15 M-row trace).

    >>> _in_order(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0, 0, 0]), chunk=1)
    True
    >>> _in_order(np.array([0, 0, 1]), np.array([1, 0, 0]), np.array([0, 0, 0]), chunk=1)
    False
    """
    n = r.shape[0]
    for lo in range(0, n - 1, chunk):
        a, b = slice(lo, min(lo + chunk, n - 1)), slice(lo + 1, min(lo + chunk, n - 1) + 1)
        ok = (r[b] > r[a]) | ((r[b] == r[a]) & ((p[b] > p[a]) | ((p[b] == p[a]) & (l[b] >= l[a]))))
        if not ok.all():
            return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"simcache {version('simcache')}"
    except Exception:  # not installed: running from a checkout
        return "simcache (source)"
