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

Hybrid execution (docs/design.md §11) adds the host CPU as a third executor: its expert FFN time by
token count, alone and while copies run, for a few thread counts (the ``cpu_*`` fields), the
activation round trip that sends a CPU expert's tokens down and its results back (``act_*``),
and how much copies slow while the CPU computes. :data:`REFERENCES` names the built-in
machines: ``h200`` (the default) and ``rtx4090`` (a consumer PCIe 4.0 setup, published figures).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
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
    # ---- host CPU executor (docs/design.md §11); empty cpu_threads = no CPU table ----
    cpu_model: str = ""
    cpu_dtype: str = ""
    cpu_expert_bytes: int = MIXTRAL_EXPERT_BYTES
    cpu_call_s: float = 0.0
    cpu_threads: list = field(default_factory=list)
    cpu_tokens: list = field(default_factory=list)
    cpu_seconds: list = field(default_factory=list)
    cpu_busy_seconds: list = field(default_factory=list)
    cpu_copy_slowdown: list = field(default_factory=list)
    cpu_thread_choice: int = 0
    cpu_group_s: float = 0.0
    act_token_bytes: int = 0
    act_latency_s: float = 0.0
    act_gbps: float = 0.0

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

    # ---- the host CPU (docs/design.md §11) ----------------------------------------------------------
    # cpu_seconds[i][k] / cpu_busy_seconds[i][k]: one expert's FFN on the host with
    # cpu_threads[i] threads for cpu_tokens[k] tokens, alone / while copies run;
    # cpu_copy_slowdown[i]: copy time factor while the CPU computes with cpu_threads[i] threads;
    # cpu_call_s: the part of an FFN that does not scale with the expert's bytes (per-call cost),
    # the rest streams the weights from host memory and scales with them, as on the GPU;
    # cpu_group_s: the CPU path's hand-off, paid once by a group with any CPU expert (the host
    # side waking for its tokens, the GPU side resuming on its results; the probe measures it
    # through the replay's executor); 0 in calibrations made before it was measured.

    @property
    def has_cpu(self) -> bool:
        return len(self.cpu_threads) > 0

    def _cpu_row(self) -> int:
        if self.cpu_thread_choice not in self.cpu_threads:
            raise SimcacheError(f"calibration {self.device!r}: cpu_thread_choice {self.cpu_thread_choice} "
                                f"is not one of cpu_threads {self.cpu_threads}")
        return self.cpu_threads.index(self.cpu_thread_choice)

    def cpu_seconds_for(self, tokens, expert_bytes: int, busy: bool) -> np.ndarray:
        """Seconds of one expert's FFN on the host CPU at the chosen thread count, on ``tokens``
        tokens (array-like), alone or while copies run (``busy``); 0 for 0 tokens."""
        i = self._cpu_row()
        table = self.cpu_busy_seconds if busy else self.cpu_seconds
        t = np.asarray(tokens, float)
        out = _interp_extrapolate(t, self.cpu_tokens, table[i])
        out = self.cpu_call_s + (out - self.cpu_call_s) * (expert_bytes / self.cpu_expert_bytes)
        out[t <= 0] = 0.0
        return out

    def cpu_scaled(self, factor: float) -> "Calibration":
        """This calibration with every host FFN price (alone and busy, the per-call part too)
        multiplied by ``factor``: what the model says at another host FFN rate (a replay's
        ``predicted_at_run_rate_s``). The hand-off, the round trip and the copies are unchanged.

        >>> cal = default_calibration()
        >>> a = cal.cpu_seconds_for([1, 16], MIXTRAL_EXPERT_BYTES, busy=True)
        >>> b = cal.cpu_scaled(0.5).cpu_seconds_for([1, 16], MIXTRAL_EXPERT_BYTES, busy=True)
        >>> bool(np.allclose(b, a * 0.5))
        True
        """
        if not (math.isfinite(factor) and factor > 0):
            raise SimcacheError(f"a host FFN rate factor must be a positive number, got {factor!r}")
        return dataclasses.replace(
            self, cpu_call_s=self.cpu_call_s * factor,
            cpu_seconds=[[x * factor for x in row] for row in self.cpu_seconds],
            cpu_busy_seconds=[[x * factor for x in row] for row in self.cpu_busy_seconds])

    def roundtrip_seconds_for(self, tokens) -> np.ndarray:
        """Seconds to send ``tokens`` activations to the host and the results back: two copies
        of tokens x act_token_bytes, each the probed latency plus bytes over bandwidth."""
        t = np.asarray(tokens, float)
        one_way = self.act_latency_s + t * self.act_token_bytes / (self.act_gbps * 1e9) if self.act_gbps > 0 \
            else np.full_like(t, self.act_latency_s)
        out = 2.0 * one_way
        out[t <= 0] = 0.0
        return out

    def copy_seconds_busy(self, nbytes: float) -> float:
        """Seconds of one copy while the CPU computes at the chosen thread count."""
        slow = self.cpu_copy_slowdown[self._cpu_row()] if self.cpu_copy_slowdown else 1.0
        return self.copy_seconds(nbytes) * slow

    def require_cpu(self, miss: str) -> None:
        """A one-line error when ``--miss cpu|auto`` meets a calibration without a CPU table."""
        if not self.has_cpu:
            raise SimcacheError(
                f"--miss {miss} needs a CPU table, and calibration {self.device!r} has none "
                f"(run 'simcache probe', which measures the host, or use a reference calibration)")

    def validate(self, where: str = "calibration") -> "Calibration":
        """Check types, table shapes and signs; raise a one-line :class:`SimcacheError` naming
        the problem."""
        self._check_types(where)
        if len(self.copy_bytes) < 1 or len(self.copy_bytes) != len(self.copy_gbps):
            raise SimcacheError(f"{where}: copy_bytes and copy_gbps must be equal-length, non-empty")
        if len(self.ffn_tokens) < 1 or len(self.ffn_tokens) != len(self.ffn_seconds):
            raise SimcacheError(f"{where}: ffn_tokens and ffn_seconds must be equal-length, non-empty")
        if min(self.copy_gbps) <= 0 or min(self.ffn_seconds) < 0:
            raise SimcacheError(f"{where}: bandwidths must be positive and times non-negative")
        if not self.has_cpu:
            return self
        n, k = len(self.cpu_threads), len(self.cpu_tokens)
        if k < 1 or len(self.cpu_seconds) != n or len(self.cpu_busy_seconds) != n or \
                any(len(row) != k for row in (*self.cpu_seconds, *self.cpu_busy_seconds)):
            raise SimcacheError(f"{where}: cpu_seconds and cpu_busy_seconds need one row of "
                                f"{k} times (cpu_tokens) per thread count ({n} in cpu_threads)")
        if self.cpu_copy_slowdown and len(self.cpu_copy_slowdown) != n:
            raise SimcacheError(f"{where}: cpu_copy_slowdown needs one factor per thread count ({n})")
        if min(self.cpu_tokens) < 1 or min(self.cpu_threads) < 0:
            raise SimcacheError(f"{where}: cpu_tokens must be positive and cpu_threads non-negative (0: not known)")
        times = [x for row in (*self.cpu_seconds, *self.cpu_busy_seconds) for x in row]
        if not all(math.isfinite(x) and x > 0 for x in times):
            raise SimcacheError(f"{where}: CPU FFN times must be positive, got {min(times)!r}")
        if not all(math.isfinite(x) and x > 0 for x in self.cpu_copy_slowdown):
            raise SimcacheError(f"{where}: cpu_copy_slowdown factors must be positive")
        if self.cpu_expert_bytes <= 0 or self.cpu_call_s < 0:
            raise SimcacheError(f"{where}: cpu_expert_bytes must be positive and cpu_call_s non-negative")
        if not (math.isfinite(self.cpu_group_s) and self.cpu_group_s >= 0):
            raise SimcacheError(f"{where}: cpu_group_s must be a non-negative number of seconds, "
                                f"got {self.cpu_group_s!r}")
        if self.act_latency_s < 0 or self.act_gbps < 0 or self.act_token_bytes < 0:
            raise SimcacheError(f"{where}: act_latency_s, act_gbps and act_token_bytes must be non-negative")
        self._cpu_row()
        return self

    def _check_types(self, where: str) -> None:
        """Every int and float field a number, every list field (nested) lists of numbers: a
        JSON ``null`` or string there would otherwise surface as a traceback from arithmetic."""
        def numeric(v) -> bool:
            if isinstance(v, (list, tuple)):
                return all(numeric(x) for x in v)
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        for f in dataclasses.fields(self):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            value = getattr(self, f.name)
            if kind in ("int", "float") and not numeric(value) or kind == "list" and not (
                    isinstance(value, (list, tuple)) and numeric(value)):
                what = "a list of non-negative numbers" if kind == "list" else "a non-negative number"
                raise SimcacheError(f"{where}: {f.name} must be {what}, got {value!r:.40}")

    def to_json(self) -> str:
        return json.dumps({"calibration_version": CALIBRATION_VERSION, **asdict(self)}, indent=2)

    def save(self, path) -> Path:
        """Write atomically (temporary name, then rename)."""
        return atomic_write_text(path, self.to_json() + "\n")


def _interp_extrapolate(t: np.ndarray, xs, ys) -> np.ndarray:
    """Linear interpolation, clamped below, extrapolated along the last segment above."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    out = np.interp(t, xs, ys)
    if xs.size >= 2:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        beyond = t > xs[-1]
        out[beyond] = ys[-1] + slope * (t[beyond] - xs[-1])
    return out


def choose_threads(threads, busy, copy_slowdown, copy_s: float, tokens=None, upto: int = 64) -> int:
    """The thread count that serves misses fastest: the least mean CPU FFN time while copies
    run, over the token counts up to ``upto`` (a decode step's; ``busy[i]`` is thread count
    i's row by ``tokens``, or one number: its 1-token figure; rows without ``tokens``: over
    all their figures), plus the time the CPU's traffic
    adds to one concurrent copy (``copy_s`` seconds alone; a slowdown below 1 is noise and
    counts as none). Ties go to fewer threads. A mean,
    not the 1-token figure alone: with every core computing, the host's other threads (the
    copies', the issuing one) are descheduled now and then, and the FFN waits a scheduler
    slice, 16 or 32 ms against 0.6 (docs/hybrid.md run 7, DeepSeek-V2-Lite at 16 threads: a
    clean 1-token figure, spikes at 2, 16 and 128 tokens).

    >>> choose_threads([8, 12, 16], [9.95e-3, 7.35e-3, 14.07e-3], [1.01, 1.05, 1.061], 6.37e-3)
    12
    >>> choose_threads([12, 16], [[0.61e-3, 0.61e-3, 0.72e-3], [0.59e-3, 16.0e-3, 0.57e-3]], [1.04, 1.01], 0.34e-3,
    ...                tokens=[1, 2, 16])
    12
    """
    rows = [np.atleast_1d(np.asarray(b, float)) for b in busy]
    if tokens is not None:
        tokens = np.asarray(tokens)
        if any(r.size != tokens.size for r in rows if r.size > 1):
            raise SimcacheError(f"choose_threads: each busy row needs one figure per token count ({tokens.size})")
        keep = (tokens <= upto) | (tokens == tokens.min())  # (at least the smallest count)
        rows = [r[keep] if r.size > 1 else r for r in rows]
    cost = [float(r.mean()) + max(s - 1.0, 0.0) * copy_s for r, s in zip(rows, copy_slowdown)]
    best = min(range(len(threads)), key=lambda i: (cost[i], threads[i]))
    return int(threads[best])


# docs/design.md §11, measured on the H200 machine's host (16-core Xeon, torch bf16), one Mixtral-8x7B
# expert, four distinct experts in rotation: 1 token alone / while copies run, per thread count,
# and the copies' slowdown; 16 threads also by token count (6.68 ms for 1, 4.4 for 16, 8.4 for 64).
_H200_HOST_1TOK = {8: (9.78e-3, 9.95e-3, 1.01), 12: (6.75e-3, 7.35e-3, 1.05), 16: (6.68e-3, 14.07e-3, 6.76 / 6.37)}
_H200_HOST_16T_TOKENS = ([1, 16, 64], [6.68e-3, 4.4e-3, 8.4e-3])
# cpu_call_s: the per-call part of a host FFN, fitted from the two 16-thread 1-token figures
# of docs/design.md §11 (Mixtral expert 6.68 ms, DeepSeek-V2-Lite expert 0.46 ms) as a + b x bytes.
_DSV2L_EXPERT_BYTES = 3 * 2048 * 1408 * 2
_H200_HOST_CALL_S = 0.46e-3 - (6.68e-3 - 0.46e-3) / (MIXTRAL_EXPERT_BYTES - _DSV2L_EXPERT_BYTES) * _DSV2L_EXPERT_BYTES


def _h200_host_tables():
    """Rows per thread count: the 16-thread token curve, scaled to each count's 1-token figure
    (only 16 threads was measured by token count; the others keep its shape)."""
    tokens, curve = _H200_HOST_16T_TOKENS
    threads = sorted(_H200_HOST_1TOK)
    alone, busy = [], []
    for n in threads:
        a1, b1, _ = _H200_HOST_1TOK[n]
        alone.append([a1 * c / curve[0] for c in curve])
        busy.append([b1 * c / curve[0] for c in curve])
    slow = [_H200_HOST_1TOK[n][2] for n in threads]
    return threads, tokens, alone, busy, slow


def default_calibration() -> Calibration:
    """The H200 (PCIe 5.0 x16) reference figures of docs/design.md §5, and its host CPU's of §11."""
    threads, tokens, alone, busy, slow = _h200_host_tables()
    copy_s = MIXTRAL_EXPERT_BYTES / 54.5e9
    return Calibration(
        device="NVIDIA H200 (docs/design.md §5 reference figures)",
        copy_bytes=[1 * MIB, 16 * MIB, 1024 * MIB],
        copy_gbps=[35.0, 54.5, 55.0],
        ffn_expert_bytes=MIXTRAL_EXPERT_BYTES,
        ffn_tokens=[1, 128, 2048],
        ffn_seconds=[0.12e-3, 0.12e-3, 1.0e-3],
        overlap=True,
        source="built-in default (docs/design.md §5; host CPU: docs/design.md §11, the H200 machine's 16-core Xeon host)",
        cpu_model="16-core Xeon host of the H200 machine (docs/design.md §11)",
        cpu_dtype="bfloat16",
        cpu_expert_bytes=MIXTRAL_EXPERT_BYTES,
        cpu_call_s=_H200_HOST_CALL_S,
        cpu_threads=threads,
        cpu_tokens=tokens,
        cpu_seconds=alone,
        cpu_busy_seconds=busy,
        cpu_copy_slowdown=slow,
        cpu_thread_choice=choose_threads(threads, busy, slow, copy_s, tokens),
        # the probe's pinned 64-byte copy latency on the H200 (docs/replay-data, run 3), and
        # Mixtral's hidden size 4096 in bf16 per token
        act_token_bytes=4096 * 2,
        act_latency_s=12.8e-6,
        act_gbps=35.0,
    )


# efeslab/fiddler issue #7 ("Questions about the hardware specs for fiddler"), comment of
# 2024-05-09: Fiddler's microbenchmark with pinned torch copies on an RTX 4090, one bf16
# Mixtral-8x7B expert: weight copy CPU -> GPU 13.30 ms, GPU execution batch 1 0.59 ms, CPU
# execution batch 1 11.41 ms. Only batch 1 was published: the tables are flat in token count.
FIDDLER_4090_SOURCE = ("https://github.com/efeslab/fiddler/issues/7 (comment of 2024-05-09: RTX 4090, "
                       "pinned copy of a bf16 Mixtral-8x7B expert 13.30 ms, GPU FFN 0.59 ms, CPU FFN "
                       "11.41 ms at batch 1)")


def rtx4090_calibration() -> Calibration:
    """A consumer setup from published figures: RTX 4090 on PCIe 4.0 (Fiddler's issue tracker)."""
    return Calibration(
        device="NVIDIA RTX 4090, PCIe 4.0 (published figures, efeslab/fiddler#7)",
        copy_bytes=[MIXTRAL_EXPERT_BYTES],
        copy_gbps=[MIXTRAL_EXPERT_BYTES / 13.30e-3 / 1e9],
        ffn_expert_bytes=MIXTRAL_EXPERT_BYTES,
        ffn_tokens=[1],
        ffn_seconds=[0.59e-3],
        overlap=True,
        source=FIDDLER_4090_SOURCE,
        cpu_model="host CPU of the RTX 4090 machine (not named in the source)",
        cpu_dtype="bfloat16",
        cpu_expert_bytes=MIXTRAL_EXPERT_BYTES,
        cpu_threads=[0],  # 0: the thread count was not published
        cpu_tokens=[1],
        cpu_seconds=[[11.41e-3]],
        cpu_busy_seconds=[[11.41e-3]],  # no contention figure published: taken as none
        cpu_copy_slowdown=[1.0],
        cpu_thread_choice=0,
        # not published: the H200 probe's pinned-copy latency and Mixtral's bf16 hidden
        act_token_bytes=4096 * 2,
        act_latency_s=12.8e-6,
        act_gbps=24.0,
    )


REFERENCES = {"h200": default_calibration, "rtx4090": rtx4090_calibration}


def load_calibration(path) -> Calibration:
    """Read a calibration JSON written by ``simcache probe``, or name a built-in reference
    machine (:data:`REFERENCES`: ``h200``, ``rtx4090``)."""
    if str(path) in REFERENCES:
        return REFERENCES[str(path)]()
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
    cal.validate(str(path))
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
