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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from simcache._files import check_output, commit, temp_beside
from simcache.errors import SimcacheError

SCHEMA_VERSION = 1
SCHEMA_VERSION_GAPS = 1.1  # -1 = no record (gaps, padding); written only when a -1 is present
READABLE_VERSIONS = (SCHEMA_VERSION, SCHEMA_VERSION_GAPS)
NO_EXPERT = -1
METADATA_KEY = b"simcache"
ROW_GROUP_ROWS = 1 << 20

# Metadata every trace carries; the rest (model, architecture, expert_bytes, dtype, capture,
# corpus, tool_version, ...) is optional and passed through unchanged.
REQUIRED_METADATA = ("num_layers", "num_experts", "top_k")


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
    domains: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    step: np.ndarray | None = None
    lookahead: np.ndarray | None = None
    lookahead_scores: np.ndarray | None = None

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
        rows = experts.shape[0]
        request = _int_column(request, "request", rows, np.int32)
        position = _int_column(position, "position", rows, np.int32)
        layer = _int_column(layer, "layer", rows, np.int16)
        phase = (
            np.ones(rows, np.int8) if phase is None else _int_column(phase, "phase", rows, np.int8)
        )
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32)
            if weights.shape != experts.shape:
                raise SimcacheError(
                    f"weights shape {weights.shape} does not match experts shape {experts.shape}"
                )
        if token_id is not None:
            token_id = _int_column(token_id, "token_id", rows, np.int32)
        if step is not None:
            step = _int_column(step, "step", rows, np.int32)
        domains: tuple[str, ...] = ()
        if domain is not None:
            labels = np.asarray(domain, dtype=object)
            if labels.shape != (rows,):
                raise SimcacheError(f"domain must have one label per row ({rows})")
            present = sorted({str(x) for x in labels if x is not None})
            lookup = {name: i for i, name in enumerate(present)}
            domain = np.array([-1 if x is None else lookup[str(x)] for x in labels], np.int16)
            domains = tuple(present)
        if rows and "num_layers" not in metadata:
            metadata["num_layers"] = int(layer.max()) + 1
        metadata["num_experts"] = int(num_experts)
        metadata["top_k"] = int(experts.shape[1])
        trace = cls(
            request=request,
            position=position,
            phase=phase,
            layer=layer,
            experts=_expert_ids(experts, num_experts),
            weights=weights,
            token_id=token_id,
            domain=domain,
            domains=domains,
            metadata=dict(metadata),
            step=step,
        )
        return _sorted(trace).validated()

    def validated(self) -> "Trace":
        """Check the invariants of docs/design.md §2; raise :class:`SimcacheError` naming the first
        one broken. Returns self."""
        meta = self.metadata
        for key in REQUIRED_METADATA:
            if key not in meta:
                raise SimcacheError(f"trace metadata lacks '{key}'")
        L, E, k = self.num_layers, self.num_experts, self.top_k
        if L <= 0 or E <= 0 or k <= 0:
            raise SimcacheError(f"trace metadata has non-positive shape: layers={L} experts={E} top_k={k}")
        rows = self.request.shape[0]
        if rows == 0:
            raise SimcacheError("trace is empty (no rows)")
        if self.experts.shape != (rows, k):
            raise SimcacheError(
                f"experts have {self.experts.shape[1]} per row but metadata says top_k={k}"
            )
        if k > E:
            raise SimcacheError(f"top_k={k} exceeds num_experts={E}")
        lo, hi = int(self.experts.min()), int(self.experts.max())
        if lo < NO_EXPERT or hi >= E:
            bad = hi if hi >= E else lo
            raise SimcacheError(f"expert id {bad} is outside [0, {E}) (num_experts={E})")
        if lo == NO_EXPERT and k > 1:
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
        if int(self.layer.min()) < 0 or int(self.layer.max()) >= L:
            raise SimcacheError(f"layer index outside [0, {L}) (num_layers={L})")
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
        if not ((self.phase == 0) | (self.phase == 1)).all():
            raise SimcacheError("phase must be 0 (prefill) or 1 (decode)")
        ph = self.phase.reshape(-1, L)
        if not (ph == ph[:, :1]).all():
            raise SimcacheError("phase differs between layers of one token")
        tph = ph[:, 0]
        if (same & (tph[1:] < tph[:-1])).any():
            i = int(np.nonzero(same & (tph[1:] < tph[:-1]))[0][0])
            raise SimcacheError(f"request {tr[i]} has a prefill token after a decode token")
        if self.domain is not None and self.domain.size and int(self.domain.max()) >= len(self.domains):
            raise SimcacheError("domain code outside the domain table")
        if self.step is not None:
            st = self.step.reshape(-1, L)
            if not (st == st[:, :1]).all():
                raise SimcacheError("step differs between layers of one token")
        if self.lookahead is not None and self.lookahead.shape[0] != rows:
            raise SimcacheError("lookahead must have one row per trace row")
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

        def take(a):
            return None if a is None else np.ascontiguousarray(a[keep])

        sub = Trace(
            request=take(self.request),
            position=take(self.position),
            phase=take(self.phase),
            layer=take(self.layer),
            experts=take(self.experts),
            weights=take(self.weights),
            token_id=take(self.token_id),
            domain=take(self.domain),
            domains=self.domains,
            metadata=dict(self.metadata),
            step=take(self.step),
            lookahead=take(self.lookahead),
            lookahead_scores=take(self.lookahead_scores),
        )
        return sub.validated()

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

    Raises :class:`SimcacheError` with a one-line message when the file is missing, not
    Parquet, lacks simcache metadata, has the wrong columns or types, or breaks an invariant.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise SimcacheError(f"trace file not found: {path}")
    if path.is_dir():
        raise SimcacheError(f"trace path is a directory, not a Parquet file: {path}")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
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
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise SimcacheError(
            f"{path}: trace schema version {version!r} is not supported (expected "
            f"{' or '.join(map(str, READABLE_VERSIONS))})"
        )
    schema = pf.schema_arrow
    for name in ("request", "position", "phase", "layer", "experts"):
        if schema.get_field_index(name) < 0:
            raise SimcacheError(f"{path}: missing column '{name}'")
    for key in REQUIRED_METADATA:
        if key not in meta:
            raise SimcacheError(f"{path}: metadata lacks '{key}'")
    k = int(meta["top_k"])
    for name in ("experts", "weights"):
        i = schema.get_field_index(name)
        if i < 0:
            continue
        ftype = schema.field(i).type
        if not pa.types.is_fixed_size_list(ftype):
            raise SimcacheError(f"{path}: column '{name}' must be fixed_size_list, got {ftype}")
        if ftype.list_size != k:
            raise SimcacheError(
                f"{path}: column '{name}' has {ftype.list_size} entries per row but top_k={k}"
            )
    for name in ("request", "position", "phase", "layer", "token_id", "step"):
        i = schema.get_field_index(name)
        if i >= 0 and not pa.types.is_integer(schema.field(i).type):
            raise SimcacheError(f"{path}: column '{name}' must be an integer, got {schema.field(i).type}")
    if not pa.types.is_integer(schema.field("experts").type.value_type):
        raise SimcacheError(f"{path}: column 'experts' must hold integers")
    if pf.metadata.num_rows == 0:
        raise SimcacheError(f"{path}: trace is empty (no rows)")
    names = set(schema.names)

    def read(name):
        # one column at a time, so Arrow's copy of the file never sits beside all of ours
        try:
            return pf.read(columns=[name]).column(0).combine_chunks()
        except (pa.ArrowInvalid, OSError) as exc:
            raise SimcacheError(f"{path}: cannot read column '{name}' ({_first_line(exc)})") from None

    def column(name, dtype):
        if name not in names:
            return None
        return np.ascontiguousarray(read(name).to_numpy(zero_copy_only=False), dtype=dtype)

    def fixed_list(name, dtype, width=k):
        if name not in names:
            return None
        col = read(name)
        if col.null_count:
            raise SimcacheError(f"{path}: column '{name}' has null rows")
        values = col.flatten().to_numpy(zero_copy_only=False)
        if values.shape[0] != len(col) * width:
            raise SimcacheError(f"{path}: column '{name}' has null entries")
        return np.ascontiguousarray(values, dtype=dtype).reshape(-1, width)

    lookahead = lookahead_scores = None
    if "lookahead" in names:
        width = schema.field("lookahead").type.list_size
        lookahead = fixed_list("lookahead", np.int16, width)
        lookahead_scores = fixed_list("lookahead_scores", np.float32, width)

    domain, domains = None, ()
    if "domain" in names:
        col = read("domain")
        if not pa.types.is_dictionary(col.type):
            col = col.dictionary_encode()
        domains = tuple(str(x) for x in col.dictionary.to_pylist())
        domain = np.asarray(col.indices.fill_null(-1).to_numpy(zero_copy_only=False), np.int16)
    try:  # native width: range-checked before narrowing to int16
        experts = _expert_ids(fixed_list("experts", None), int(meta["num_experts"]),
                              missing_ok=version == SCHEMA_VERSION_GAPS)
    except SimcacheError as exc:
        raise SimcacheError(f"{path}: {exc}") from None
    trace = Trace(
        request=column("request", np.int32),
        position=column("position", np.int32),
        phase=column("phase", np.int8),
        layer=column("layer", np.int16),
        experts=experts,
        weights=fixed_list("weights", np.float32),
        token_id=column("token_id", np.int32),
        domain=domain,
        domains=domains,
        metadata={k_: v for k_, v in meta.items() if k_ != "schema_version"},
        step=column("step", np.int32),
        lookahead=lookahead,
        lookahead_scores=lookahead_scores,
    )
    try:
        return _sorted(trace).validated()
    except SimcacheError as exc:
        raise SimcacheError(f"{path}: {exc}") from None


class TraceWriter:
    """Write a trace in row groups to a temporary file; :meth:`close` renames it into place.

    Capture streams rows through this so memory stays bounded and an interrupted run leaves
    no file at ``path`` (only the temporary, which is removed on error).

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

    def __init__(self, path, *, overwrite: bool = True, missing: bool = False, **metadata):
        """``missing=True`` allows -1 ids (gaps, padding) and writes schema 1.1."""
        import pyarrow as pa

        for key in REQUIRED_METADATA:
            if key not in metadata:
                raise SimcacheError(f"trace metadata lacks '{key}'")
        self.path = check_output(path, overwrite)
        self.k = int(metadata["top_k"])
        self.missing = bool(missing)
        version = SCHEMA_VERSION_GAPS if missing else SCHEMA_VERSION
        self.metadata = {**metadata, "schema_version": version}
        self.metadata.setdefault("tool_version", _tool_version())
        self._writer = None
        self._schema_fields = None
        self._tmp = temp_beside(self.path)
        self.rows = 0
        self._pending: list = []
        self._pending_rows = 0
        self._pa = pa

    def _schema(self, has_weights, has_token, has_domain, has_step, lookahead_width):
        pa = self._pa
        fields = [
            pa.field("request", pa.int32(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("phase", pa.int8(), nullable=False),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("experts", pa.list_(pa.int16(), self.k), nullable=False),
        ]
        if has_weights:
            fields.append(pa.field("weights", pa.list_(pa.float32(), self.k), nullable=False))
        if has_token:
            fields.append(pa.field("token_id", pa.int32()))
        if has_domain:
            fields.append(pa.field("domain", pa.dictionary(pa.int16(), pa.string())))
        if has_step:
            fields.append(pa.field("step", pa.int32(), nullable=False))
        if lookahead_width:
            fields.append(pa.field("lookahead", pa.list_(pa.int16(), lookahead_width), nullable=False))
            fields.append(pa.field("lookahead_scores", pa.list_(pa.float32(), lookahead_width), nullable=False))
        meta = {METADATA_KEY: json.dumps(self.metadata, sort_keys=True).encode()}
        return pa.schema(fields, metadata=meta)

    def write(self, *, request, position, phase, layer, experts, weights=None, token_id=None, domain=None,
              step=None, lookahead=None, lookahead_scores=None):
        """Append rows. ``domain`` is a sequence of labels (str or None), one per row;
        ``lookahead`` and ``lookahead_scores`` come together, (rows, width) each."""
        import pyarrow.parquet as pq

        pa = self._pa
        experts = np.asarray(experts, dtype=np.int16).reshape(-1, self.k)
        n = experts.shape[0]
        if n == 0:
            return
        if not self.missing and int(experts.min()) < 0:
            raise SimcacheError("expert id -1 (no record) in a trace written without missing=True")
        arrays = [
            pa.array(np.asarray(request, np.int32)),
            pa.array(np.asarray(position, np.int32)),
            pa.array(np.asarray(phase, np.int8)),
            pa.array(np.asarray(layer, np.int16)),
            pa.FixedSizeListArray.from_arrays(pa.array(experts.ravel()), self.k),
        ]
        if weights is not None:
            w = np.asarray(weights, np.float32).reshape(-1, self.k)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(w.ravel()), self.k))
        if token_id is not None:
            arrays.append(pa.array(np.asarray(token_id, np.int32)))
        if domain is not None:
            arrays.append(pa.array(list(domain), pa.string()).dictionary_encode().cast(
                pa.dictionary(pa.int16(), pa.string())))
        if step is not None:
            arrays.append(pa.array(np.asarray(step, np.int32)))
        width = 0
        if lookahead is not None:
            la = np.asarray(lookahead, np.int16)
            width = la.shape[1]
            ls = np.asarray(lookahead_scores, np.float32).reshape(-1, width)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(la.ravel()), width))
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(ls.ravel()), width))
        shape = (weights is not None, token_id is not None, domain is not None, step is not None, width)
        if self._writer is None:
            self._schema_fields = shape
            schema = self._schema(*shape)
            self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        elif shape != self._schema_fields:
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
        commit(self._tmp, self.path)

    def abort(self):
        """Drop the temporary file; ``path`` is left as it was."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp.exists():
            self._tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_trace(trace: Trace, path, *, overwrite: bool = True) -> Path:
    """Write ``trace`` to ``path`` (Parquet, zstd), atomically: temporary name, then rename."""
    meta = dict(trace.metadata)
    meta.pop("schema_version", None)
    domain = None
    if trace.domain is not None:
        names = np.array(list(trace.domains) + [None], dtype=object)
        domain = names[np.where(trace.domain < 0, len(trace.domains), trace.domain)]
    with TraceWriter(path, overwrite=overwrite, missing=trace.has_missing, **meta) as writer:
        step = ROW_GROUP_ROWS
        for lo in range(0, trace.num_rows, step):
            hi = min(lo + step, trace.num_rows)
            writer.write(
                request=trace.request[lo:hi],
                position=trace.position[lo:hi],
                phase=trace.phase[lo:hi],
                layer=trace.layer[lo:hi],
                experts=trace.experts[lo:hi],
                weights=None if trace.weights is None else trace.weights[lo:hi],
                token_id=None if trace.token_id is None else trace.token_id[lo:hi],
                domain=None if domain is None else domain[lo:hi],
                step=None if trace.step is None else trace.step[lo:hi],
                lookahead=None if trace.lookahead is None else trace.lookahead[lo:hi],
                lookahead_scores=None if trace.lookahead is None else trace.lookahead_scores[lo:hi],
            )
    return Path(path)


# ---- helpers ----------------------------------------------------------------------------


def _int_column(values, name, rows, dtype):
    a = np.asarray(values)
    if a.shape != (rows,):
        raise SimcacheError(f"{name} must have shape ({rows},), got {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(a == np.round(a)):
            raise SimcacheError(f"{name} must hold integers")
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise SimcacheError(f"{name} values do not fit {np.dtype(dtype).name}")
    return np.ascontiguousarray(a, dtype=dtype)


def _expert_ids(experts: np.ndarray, num_experts: int, missing_ok: bool = True) -> np.ndarray:
    """Expert ids as int16 after a range check: [0, E), or -1 (no record) when ``missing_ok``."""
    if experts.size and not np.issubdtype(experts.dtype, np.integer):
        raise SimcacheError("experts must hold integer ids")
    if num_experts > np.iinfo(np.int16).max:
        raise SimcacheError(f"num_experts={num_experts} does not fit the int16 expert column")
    if experts.size:
        lo, hi = int(experts.min()), int(experts.max())
        if lo < (NO_EXPERT if missing_ok else 0) or hi >= num_experts:
            bad = hi if hi >= num_experts else lo
            raise SimcacheError(f"expert id {bad} is outside [0, {num_experts}) (num_experts={num_experts})")
    return np.ascontiguousarray(experts, dtype=np.int16)


def _sorted(trace: Trace) -> Trace:
    """Rows in (request, position, layer) order; returns the same object when already so."""
    r, p, l = trace.request, trace.position, trace.layer
    n = r.shape[0]
    if n < 2:
        return trace
    key_r = r.astype(np.int64)
    in_order = np.all(
        (key_r[1:] > key_r[:-1])
        | ((key_r[1:] == key_r[:-1]) & ((p[1:] > p[:-1]) | ((p[1:] == p[:-1]) & (l[1:] >= l[:-1]))))
    )
    if in_order:
        return trace
    order = np.lexsort((l, p, r))

    def take(a):
        return None if a is None else np.ascontiguousarray(a[order])

    return Trace(
        request=take(r),
        position=take(p),
        phase=take(trace.phase),
        layer=take(l),
        experts=take(trace.experts),
        weights=take(trace.weights),
        token_id=take(trace.token_id),
        domain=take(trace.domain),
        domains=trace.domains,
        metadata=trace.metadata,
        step=take(trace.step),
        lookahead=take(trace.lookahead),
        lookahead_scores=take(trace.lookahead_scores),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"simcache {version('simcache')}"
    except Exception:  # not installed: running from a checkout
        return "simcache (source)"
