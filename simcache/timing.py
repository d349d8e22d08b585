"""The cost model (docs/design.md §5): seconds for expert loads over PCIe and for expert FFNs.

Per (step, layer): transfer = loads x copy time of one expert; compute = sum over demanded
experts of the FFN time (on the GPU) for the tokens routed to it. With a copy stream
(``overlap``) a (step, layer) takes max(compute, transfer + the last loaded expert's compute),
else compute + transfer. Only expert work on the GPU is modelled: attention, the rest of the
model and the host's time to issue the work are not, so the reported time per token is the
*expert* time of a runtime that keeps the GPU fed (docs/replay.md shows where a Python harness
does not).

A :class:`Calibration` holds the measured tables; ``simcache probe`` writes one as JSON on a
GPU, and the built-in default carries the H200 figures of docs/design.md §5.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from simcache._files import atomic_write_text, check_input
from simcache._jit import kernel as jit
from simcache.errors import SimcacheError

CALIBRATION_VERSION = 1
MIB = 1 << 20
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # bf16 w1, w2, w3 of one Mixtral-8x7B expert


@dataclass(frozen=True)
class Calibration:
    """Measured transfer and compute tables of one GPU.

    Attributes
    ----------
    device : str
        The GPU the numbers come from.
    copy_bytes, copy_gbps : list
        Pinned host-to-device bandwidth (GB/s, 1e9 bytes) by copy size; interpolated in
        log(size), clamped at both ends.
    ffn_expert_bytes : int
        Size of the expert the FFN table was measured on.
    ffn_tokens, ffn_seconds : list
        SwiGLU expert FFN time by token count; interpolated linearly, extrapolated along the
        last segment, and scaled by expert size for other experts (the FFN streams its weights,
        so its time follows their bytes).
    overlap : bool
        Whether copies run on a side stream concurrently with compute.
    group_ffn : dict
        The grouped FFN table of the replay's fast issue path (``simcache probe``): keys
        ``experts`` (n), ``tokens`` (per expert, t), ``seconds`` (n x t nested list),
        ``fixed_seconds`` (the group's own work outside its grouped calls) and ``expert_bytes``. Empty in older files: groups are then priced expert by expert from
        the per-token-count table above (:func:`group_seconds`).
    source : str
        Where the numbers come from.
    """

    device: str
    copy_bytes: list = field(default_factory=list)
    copy_gbps: list = field(default_factory=list)
    ffn_expert_bytes: int = MIXTRAL_EXPERT_BYTES
    ffn_tokens: list = field(default_factory=list)
    ffn_seconds: list = field(default_factory=list)
    overlap: bool = True
    source: str = ""
    extra: dict = field(default_factory=dict)
    group_ffn: dict = field(default_factory=dict)

    def copy_seconds(self, nbytes: float) -> float:
        """Seconds to copy ``nbytes`` from pinned host memory to the GPU."""
        if nbytes <= 0:
            return 0.0
        x = np.log(np.asarray(self.copy_bytes, float))
        gbps = float(np.interp(math.log(nbytes), x, np.asarray(self.copy_gbps, float)))
        return nbytes / (gbps * 1e9)

    def ffn_seconds_for(self, tokens, expert_bytes: int) -> np.ndarray:
        """Seconds of one expert's FFN on ``tokens`` tokens (array-like)."""
        t = np.asarray(tokens, float)
        xs = np.asarray(self.ffn_tokens, float)
        ys = np.asarray(self.ffn_seconds, float)
        out = np.interp(t, xs, ys)
        if xs.size >= 2:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            beyond = t > xs[-1]
            out[beyond] = ys[-1] + slope * (t[beyond] - xs[-1])
        out[t <= 0] = 0.0
        return out * (expert_bytes / self.ffn_expert_bytes)

    def group_table(self, expert_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The grouped FFN table as (experts (n,), tokens per expert (t,), seconds (n, t),
        fixed seconds per group), scaled to ``expert_bytes``; empty where there is none."""
        g = self.group_ffn
        if not g:
            return np.zeros(0), np.zeros(0), np.zeros((0, 0)), 0.0
        table = np.asarray(g["seconds"], np.float64) * (expert_bytes / g["expert_bytes"])
        return (np.asarray(g["experts"], np.float64), np.asarray(g["tokens"], np.float64), table,
                float(g.get("fixed_seconds", 0.0)))

    def to_json(self) -> str:
        return json.dumps({"calibration_version": CALIBRATION_VERSION, **asdict(self)}, indent=2)

    def save(self, path) -> Path:
        """Write atomically (temporary name, then rename)."""
        return atomic_write_text(path, self.to_json() + "\n")


def default_calibration() -> Calibration:
    """The H200 (PCIe 5.0 x16) reference figures of docs/design.md §5."""
    return Calibration(
        device="NVIDIA H200 (docs/design.md §5 reference figures)",
        copy_bytes=[1 * MIB, 16 * MIB, 1024 * MIB],
        copy_gbps=[35.0, 54.5, 55.0],
        ffn_expert_bytes=MIXTRAL_EXPERT_BYTES,
        ffn_tokens=[1, 128, 2048],
        ffn_seconds=[0.12e-3, 0.12e-3, 1.0e-3],
        overlap=True,
        source="built-in default (docs/design.md §5)",
    )


def load_calibration(path) -> Calibration:
    """Read a calibration JSON written by ``simcache probe``."""
    path = check_input(path, "calibration file")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise SimcacheError(f"calibration file is not valid JSON: {path}") from None
    if not isinstance(data, dict) or data.get("calibration_version") != CALIBRATION_VERSION:
        raise SimcacheError(f"{path} is not a simcache calibration (version {CALIBRATION_VERSION})")
    data.pop("calibration_version")
    try:
        cal = Calibration(**data)
    except TypeError as exc:
        raise SimcacheError(f"{path}: unexpected calibration fields ({exc})") from None
    if len(cal.copy_bytes) < 1 or len(cal.copy_bytes) != len(cal.copy_gbps):
        raise SimcacheError(f"{path}: copy_bytes and copy_gbps must be equal-length, non-empty")
    if len(cal.ffn_tokens) < 1 or len(cal.ffn_tokens) != len(cal.ffn_seconds):
        raise SimcacheError(f"{path}: ffn_tokens and ffn_seconds must be equal-length, non-empty")
    if min(cal.copy_gbps) <= 0 or min(cal.ffn_seconds) < 0:
        raise SimcacheError(f"{path}: bandwidths must be positive and times non-negative")
    _check_group_ffn(path, cal.group_ffn)
    return cal


# ---- the grouped FFN of the replay's fast issue path ------------------------------------------
# The fast path (simcache.replay.issue) computes a (step, layer) in two grouped calls: the hits
# first, while the loads copy, then every loaded expert once the last copy has landed. With a
# copy stream the group takes max(fixed + G(hits), transfer) + G(loads), else the sum of all
# four, where G(n, T) is the probed time of one grouped call on n experts with T tokens routed
# to them in all and ``fixed`` the group's own gather, zeroing and sum (probed once).


def group_table_for(calibration: Calibration | None, expert_bytes: int | None):
    """:meth:`Calibration.group_table` of ``calibration`` (default: the built-in one, which
    has none), empty where the expert size is unknown."""
    cal = calibration if calibration is not None else default_calibration()
    if expert_bytes is None:
        return np.zeros(0), np.zeros(0), np.zeros((0, 0)), 0.0
    return cal.group_table(expert_bytes)


def _check_group_ffn(path, g) -> None:
    if not g:
        return
    try:
        n, t, s = (np.asarray(g[k], float) for k in ("experts", "tokens", "seconds"))
        ok = (n.ndim == t.ndim == 1 and s.shape == (n.size, t.size) and n.size and t.size
              and np.all(np.diff(n) > 0) and np.all(np.diff(t) > 0) and n[0] >= 1 and t[0] >= 1
              and s.min() >= 0 and float(g["expert_bytes"]) > 0 and float(g.get("fixed_seconds", 0)) >= 0)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise SimcacheError(f"{path}: group_ffn needs increasing experts and tokens (>= 1), a seconds "
                            f"table of their shape and a positive expert_bytes")


@jit
def _interp(xs, x):
    """(index, fraction) of x on the increasing axis xs, clamped below; past the end the
    fraction runs beyond 1 along the last segment (linear extrapolation)."""
    m = xs.shape[0]
    if m == 1 or x <= xs[0]:
        return 0, 0.0
    j = 0
    while j < m - 2 and x > xs[j + 1]:
        j += 1
    return j, (x - xs[j]) / (xs[j + 1] - xs[j])


@jit
def grouped_ffn_seconds(experts, tokens, table, n, total_tokens):
    """G(n, T): one grouped call on ``n`` experts with ``total_tokens`` tokens in all, from the
    table at the mean tokens per expert: bilinear inside it, linear along the last segment in
    tokens past its end, and proportional to n past its largest n (one more expert's weights
    to stream)."""
    if n <= 0:
        return 0.0
    t = total_tokens / n
    scale = 1.0
    x = float(n)
    if x > experts[-1]:
        scale = x / experts[-1]
        x = experts[-1]
    i, a = _interp(experts, x)
    j, b = _interp(tokens, t)
    i1 = min(i + 1, experts.shape[0] - 1)
    j1 = min(j + 1, tokens.shape[0] - 1)
    lo = table[i, j] + b * (table[i, j1] - table[i, j])
    hi = table[i1, j] + b * (table[i1, j1] - table[i1, j])
    return max(0.0, lo + a * (hi - lo)) * scale


@jit
def group_seconds(experts, tokens, table, fixed, hits, hit_tokens, loads, load_tokens, transfer, overlap):
    """(compute, time) of one (step, layer) on the fast issue path; see the section comment."""
    first = fixed + grouped_ffn_seconds(experts, tokens, table, hits, hit_tokens)
    g_loads = grouped_ffn_seconds(experts, tokens, table, loads, load_tokens)
    if overlap:
        return first + g_loads, max(first, transfer) + g_loads
    return first + g_loads, first + transfer + g_loads
