"""The expert-cache simulator: one loop, small policies (DESIGN §4).

For each (step, layer) group, in execution order:

1. demanded residents are hits and are pinned for this group;
2. in expert order, hits are touched and each miss asks the admission rule: admitted -> a
   free slot, else the eviction rule's victim among unpinned residents, then a fill;
   refused -> a bypass (streamed through a transient buffer; the cache and its order are
   untouched); admitted but every resident pinned -> a forced bypass;
3. every miss is one expert load over PCIe.

The bookkeeping lives once, in :func:`_run`; a policy only answers ``victim`` and ``admit``
(and keeps its own order on access and eviction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from simcache._jit import kernel as jit
from simcache.errors import SimcacheError
from simcache.policies import _dispatch as dispatch
from simcache.policies import learner_for, policy_name, resolve
from simcache.state import Learner, new_state
from simcache.timing import Calibration, default_calibration, group_seconds
from simcache.trace import Trace
from simcache.workload import Workload

SCOPES = ("layer", "global")

# decision codes (record=True), also the first four counter columns
HIT, FILL, BYPASS, FORCED_BYPASS = 0, 1, 2, 3
OUTCOME_NAMES = ("hit", "fill", "bypass", "forced")
EVICTIONS, RELOADS, ACCESSES = 4, 5, 6
COUNTER_NAMES = ("hits", "fills", "bypasses", "forced_bypasses", "evictions", "reloads", "accesses")

CHUNK_ACCESSES = 4_000_000  # accesses per kernel call between progress updates


@jit
def _run(
    g0, g1, group_ptr, tokens, L, per_layer, S, M,
    evict_tag, admit_tag, learner_tag, record_tag,
    counters, layer_time, t_copy, ffn_lut, overlap, group_n, group_t, group_s, group_fixed,
    out_outcome, out_slot, out_victim, out_group_time,
):
    """Serve groups g0..g1-1. Per access it counts the outcome (counters[layer, outcome]),
    evictions and reloads; per group it adds the accesses (counters[layer, ACCESSES]) and
    the group's compute and predicted time (layer_time[layer, 0 and 1]).

    Policy codes and the record flag arrive as tuple lengths (see :func:`_tag`), so each
    policy pair compiles to its own specialisation in which the dispatch chains and unused
    bookkeeping fold away (+35% accesses/s on LRU).
    """
    evict = len(evict_tag) - 1
    admit_code = len(admit_tag) - 1
    learner = len(learner_tag) - 1
    record = len(record_tag) == 2
    has_future = evict == dispatch.BELADY or admit_code == dispatch.ORACLE
    s = g0 // L
    l = g0 - s * L - 1
    for g in range(g0, g1):
        l += 1  # (step, layer) of group g, without a division per group
        if l == L:
            l = 0
            s += 1
        lo = group_ptr[g]
        hi = group_ptr[g + 1]
        if lo == hi:
            continue
        pool = l if per_layer else 0
        stamp = g + 1
        dispatch.learn(learner, S, M, s, l, lo, hi)
        # 1. demanded residents are hits, pinned for this group: no miss may evict them.
        # Branch-free: an absent key's slot -1 pins the spare last entry of S.pin (a branch
        # here mispredicts on every other access: -20% accesses/s).
        if hi - lo > 1:  # (a lone access has no other miss to protect itself from)
            for i in range(lo, hi):
                S.pin[S.where[S.keys[i]]] = stamp
        # 2. in expert order: hits are touched, misses ask admission and eviction. Touching
        # hits and fills in one order that does not depend on which were hits keeps LRU a
        # stack algorithm (hits never fall as capacity grows).
        loads = 0
        compute = 0.0
        last_miss = 0.0
        group_tokens = 0
        load_tokens = 0
        for i in range(lo, hi):
            key = S.keys[i]
            cost = ffn_lut[tokens[i]]
            compute += cost
            group_tokens += tokens[i]
            slot = S.where[key]
            if slot >= 0:  # a hit (misses of this group are filled only at their own index;
                # pass 1 pinned it, or it is the group's only access)
                if has_future:
                    S.nu[slot] = S.future[i]
                dispatch.on_access(evict, S, slot, i, False)
                counters[l, HIT] += 1
                if record:
                    out_outcome[i] = HIT
                    out_slot[i] = slot - S.base[pool]
                    out_victim[i] = -1
                continue
            loads += 1
            last_miss = cost
            load_tokens += tokens[i]
            outcome = BYPASS
            gone = -1
            if dispatch.admit(admit_code, S, M, pool, i, hi, stamp):
                outcome = FORCED_BYPASS
                if S.used[pool] < S.cap[pool]:
                    slot = S.base[pool] + S.used[pool]
                    S.used[pool] += 1
                else:
                    slot = dispatch.victim(evict, S, M, pool, stamp)
                    if slot >= 0:
                        gone = S.slot_key[slot]
                        dispatch.on_evict(evict, S, slot)
                        S.where[gone] = -1
                        S.evicted[gone] = True
                        counters[l, EVICTIONS] += 1
                if slot >= 0:
                    if S.evicted[key]:
                        counters[l, RELOADS] += 1
                    S.where[key] = slot
                    S.slot_key[slot] = key
                    S.pin[slot] = stamp
                    if has_future:
                        S.nu[slot] = S.future[i]
                    dispatch.on_access(evict, S, slot, i, True)
                    outcome = FILL
            counters[l, outcome] += 1
            if record:
                out_outcome[i] = outcome
                out_slot[i] = slot - S.base[pool] if slot >= 0 else -1
                out_victim[i] = gone
        # 3. time of this group: copies on a side stream overlap compute, but the last loaded
        # expert can only compute after its copy; without overlap the two add up
        transfer = loads * t_copy
        counters[l, ACCESSES] += hi - lo
        if group_s.shape[0] > 0:  # a grouped FFN table: the replay's fast issue path
            compute, t = group_seconds(group_n, group_t, group_s, group_fixed, hi - lo - loads,
                                       group_tokens - load_tokens, loads, load_tokens, transfer, overlap)
        elif overlap:
            t = max(compute, transfer + last_miss)
        else:
            t = compute + transfer
        layer_time[l, 0] += compute
        layer_time[l, 1] += t
        if record:
            out_group_time[g] = t


def _tag(code: int) -> tuple:
    """A compile-time constant for numba: the code as the length of a tuple. (numba's own
    ``literally`` re-enters the compiler on every call; a tuple's length is part of its type.)"""
    return (0,) * (code + 1)


# ---- results -------------------------------------------------------------------------------


@dataclass
class Decisions:
    """Per access: outcome code (0 hit, 1 fill, 2 bypass, 3 forced bypass), slot inside its
    pool (hits and fills, else -1) and the evicted key (fills that evicted, else -1); per
    (step, layer) group: the predicted time in seconds."""

    outcome: np.ndarray
    slot: np.ndarray
    victim: np.ndarray
    group_time: np.ndarray


@dataclass
class SimResult:
    """Counters, bytes and predicted time of one simulation. See docs/metrics.md."""

    policy: str
    evict: str
    admit: str
    capacity: int
    scope: str
    batch: int
    prefill: str
    threshold: float | None
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int | None
    steps: int
    decode_tokens: int
    per_layer: dict[str, np.ndarray]
    calibration: str | None
    elapsed_s: float
    decisions: Decisions | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _total(self, name) -> int:
        return int(self.per_layer[name].sum())

    @property
    def accesses(self) -> int:
        return self._total("accesses")

    @property
    def hits(self) -> int:
        return self._total("hits")

    @property
    def fills(self) -> int:
        return self._total("fills")

    @property
    def bypasses(self) -> int:
        return self._total("bypasses")

    @property
    def forced_bypasses(self) -> int:
        return self._total("forced_bypasses")

    @property
    def evictions(self) -> int:
        return self._total("evictions")

    @property
    def reloads(self) -> int:
        return self._total("reloads")

    @property
    def loads(self) -> int:
        """Expert loads over PCIe: every miss, admitted or bypassed."""
        return self.fills + self.bypasses + self.forced_bypasses

    @property
    def bytes_loaded(self) -> int | None:
        return None if self.expert_bytes is None else self.loads * self.expert_bytes

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def time_s(self) -> float | None:
        return None if self.calibration is None else float(self.per_layer["time_s"].sum())

    @property
    def transfer_s(self) -> float | None:
        return None if self.calibration is None else float(self.per_layer["transfer_s"].sum())

    @property
    def compute_s(self) -> float | None:
        return None if self.calibration is None else float(self.per_layer["compute_s"].sum())

    @property
    def time_per_token_s(self) -> float | None:
        if self.time_s is None or not self.decode_tokens:
            return None
        return self.time_s / self.decode_tokens

    @property
    def tokens_per_s(self) -> float | None:
        if not self.time_s:
            return None
        return self.decode_tokens / self.time_s

    @property
    def accesses_per_s(self) -> float:
        return self.accesses / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``per_layer=True`` adds the per-layer lists."""
        out = {
            "policy": self.policy,
            "evict": self.evict,
            "admit": self.admit,
            "capacity": self.capacity,
            "scope": self.scope,
            "batch": self.batch,
            "prefill": self.prefill,
            "threshold": self.threshold,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "steps": self.steps,
            "decode_tokens": self.decode_tokens,
            "accesses": self.accesses,
            "hits": self.hits,
            "fills": self.fills,
            "bypasses": self.bypasses,
            "forced_bypasses": self.forced_bypasses,
            "evictions": self.evictions,
            "reloads": self.reloads,
            "loads": self.loads,
            "hit_ratio": self.hit_ratio,
            "expert_bytes": self.expert_bytes,
            "bytes_loaded": self.bytes_loaded,
            "compute_s": self.compute_s,
            "transfer_s": self.transfer_s,
            "time_s": self.time_s,
            "time_per_token_s": self.time_per_token_s,
            "tokens_per_s": self.tokens_per_s,
            "calibration": self.calibration,
            **self.extra,
        }
        if per_layer:
            out["per_layer"] = {k: v.tolist() for k, v in self.per_layer.items()}
        return out


# ---- the public entry point ----------------------------------------------------------------


def simulate(
    trace: Trace | Workload,
    policy: str = "lru",
    capacity: int | None = None,
    *,
    scope: str = "layer",
    batch: int = 1,
    threshold: float | str = 0.1,
    evict: str | None = None,
    admit: str | None = None,
    prefill: str = "skip",
    prior: np.ndarray | None = None,
    horizon: int = 4,
    decay_every: int = 100,
    decay: float = 0.99,
    seed: int = 0,
    calibration: Calibration | None = None,
    overlap: bool | None = None,
    expert_bytes: int | None = None,
    record: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Simulate an expert cache over a routing trace.

    Parameters
    ----------
    trace : Trace or Workload
        The routing trace, or a :class:`Workload` prepared from one (then ``batch`` and
        ``prefill`` come from it).
    policy : str
        A preset: ``lru``, ``fifo``, ``lfu``, ``lifo``, ``random``, ``belady``,
        ``belady-bypass``, ``markov``.
    capacity : int
        Slots per layer (``scope="layer"``) or in the one shared pool (``scope="global"``).
    scope : {"layer", "global"}
    batch : int
        Sequences decoding together (continuous batching).
    threshold : float or str
        Markov admission threshold tau in [0, 1]; ``"2/E"`` means 2 x the uniform baseline 1/E.
    evict, admit : str, optional
        Override the preset's eviction or admission rule.
    prefill : {"skip", "step"}
        Skip prompt tokens, or run each prompt as one step.
    prior : array (layers, E, E), optional
        Transition counts that seed the Markov learner, fitted on a *separate* trace
        (:func:`simcache.markov.fit_prior`).
    horizon : int
        Steps ahead for ``admit="markov-h"``.
    decay_every, decay : int, float
        The learner multiplies its counts by ``decay`` every ``decay_every`` steps.
    seed : int
        Seed of random eviction.
    calibration : Calibration, optional
        Transfer and compute tables; default: the H200 figures of DESIGN §5.
    overlap : bool, optional
        Copies overlap compute (a copy stream); default from the calibration.
    expert_bytes : int, optional
        Overrides the trace's ``expert_bytes``; with neither, no bytes or time are reported.
    record : bool
        Keep every access's decision (``result.decisions``).
    progress : callable, optional
        Called with the number of accesses done after each chunk.

    Returns
    -------
    SimResult

    Examples
    --------
    >>> import numpy as np, simcache
    >>> t = simcache.Trace.from_arrays(np.array([[0], [1], [0], [2], [0]]), request=[0] * 5,
    ...     position=range(5), layer=[0] * 5, num_experts=3)
    >>> r = simcache.simulate(t, "lru", capacity=2)
    >>> r.hits, r.fills, r.evictions
    (2, 3, 1)
    >>> simcache.simulate(t, "belady-bypass", capacity=1).hits
    2
    """
    eviction, admission = resolve(policy, evict, admit)
    if isinstance(trace, Workload):
        work = trace
    elif isinstance(trace, Trace):
        work = Workload(trace, batch, prefill)
    else:
        raise SimcacheError(f"simulate needs a Trace or Workload, got {type(trace).__name__}")
    tr = work.trace
    L, E = tr.num_layers, tr.num_experts
    if scope not in SCOPES:
        raise SimcacheError(f"scope must be 'layer' or 'global', got {scope!r}")
    in_scope = E if scope == "layer" else L * E
    if capacity is None:
        raise SimcacheError("capacity is required")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity <= 0:
        raise SimcacheError(f"capacity must be a positive integer, got {capacity!r}")
    if capacity > in_scope:
        where = "per layer" if scope == "layer" else "in the global pool"
        raise SimcacheError(
            f"capacity {capacity} exceeds the {in_scope} experts {where} (num_experts={E}, layers={L})"
        )
    tau = parse_threshold(threshold, E)
    if prior is not None:
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != (L, E, E):
            raise SimcacheError(f"prior has shape {prior.shape}, the trace needs ({L}, {E}, {E})")
        if not np.isfinite(prior).all() or (prior < 0).any():
            raise SimcacheError("prior counts must be finite and non-negative")
    if horizon < 1:
        raise SimcacheError(f"horizon must be >= 1, got {horizon}")
    if decay_every < 0 or not (0.0 < decay <= 1.0):
        raise SimcacheError("decay must be in (0, 1] and decay_every >= 0")

    d = work.demand
    n_acc = d.num_accesses
    needs_future = eviction.needs_future or admission.needs_future
    future = work.future if needs_future else np.zeros(0, np.int64)
    caps = [capacity] * L if scope == "layer" else [capacity]
    S = new_state(d.keys, future, L * E, L, caps, seed=seed)
    learner = learner_for(eviction, admission)
    M = _learner(work, prior, tau, horizon, decay_every, decay, learner != dispatch.NO_LEARNER)

    eb = int(expert_bytes) if expert_bytes is not None else tr.expert_bytes
    if eb is not None and eb <= 0:
        raise SimcacheError(f"expert_bytes must be positive, got {eb}")
    cal = calibration if calibration is not None else default_calibration()
    if eb is None:
        t_copy, lut, cal_name = 0.0, np.zeros(work.max_tokens + 1), None
        group_table = np.zeros(0), np.zeros(0), np.zeros((0, 0)), 0.0
    else:
        t_copy = cal.copy_seconds(eb)
        lut = cal.ffn_seconds_for(np.arange(work.max_tokens + 1), eb)
        cal_name = cal.device
        group_table = cal.group_table(eb)
    ov = cal.overlap if overlap is None else bool(overlap)

    gp = d.group_ptr
    counters = np.zeros((L, len(COUNTER_NAMES)), np.int64)
    layer_time = np.zeros((L, 2), np.float64)
    if record:
        rec = (np.full(n_acc, -1, np.int8), np.full(n_acc, -1, np.int32), np.full(n_acc, -1, np.int32),
               np.zeros(gp.shape[0] - 1, np.float64))
    else:
        rec = (np.zeros(1, np.int8), np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1))

    start = time.perf_counter()
    n_groups = gp.shape[0] - 1
    g = 0
    while g < n_groups:
        target = gp[g] + CHUNK_ACCESSES
        g_end = int(min(np.searchsorted(gp, target, side="right"), n_groups))
        g_end = max(g_end, g + 1)
        _run(
            g, g_end, gp, d.tokens, L, scope == "layer", S, M,
            _tag(eviction.code), _tag(admission.code), _tag(learner), _tag(int(record)),
            counters, layer_time, t_copy, lut, ov, *group_table, *rec,
        )
        if progress is not None:
            progress(int(gp[g_end] - gp[g]))
        g = g_end
    elapsed = time.perf_counter() - start

    per_layer = {name: counters[:, j].copy() for j, name in enumerate(COUNTER_NAMES)}
    loads = counters[:, FILL] + counters[:, BYPASS] + counters[:, FORCED_BYPASS]
    per_layer["compute_s"] = layer_time[:, 0].copy()
    per_layer["transfer_s"] = loads * t_copy
    per_layer["time_s"] = layer_time[:, 1].copy()
    return SimResult(
        policy=policy_name(eviction.name, admission.name),
        evict=eviction.name,
        admit=admission.name,
        capacity=int(capacity),
        scope=scope,
        batch=work.batch,
        prefill=work.prefill,
        threshold=tau if admission.name.startswith("markov") else None,
        model=tr.model,
        num_layers=L,
        num_experts=E,
        top_k=tr.top_k,
        expert_bytes=eb,
        steps=work.steps.num_steps,
        decode_tokens=work.steps.decode_tokens,
        per_layer=per_layer,
        calibration=cal_name,
        elapsed_s=elapsed,
        decisions=Decisions(*rec) if record else None,
    )


def _learner(work: Workload, prior, tau, horizon, decay_every, decay, active) -> Learner:
    L, E = work.trace.num_layers, work.trace.num_experts
    if not active:
        z64 = np.zeros(1, np.int64)
        return Learner(
            np.zeros((1, 1, 1)), np.zeros((1, 1), np.int16), z64, z64, z64,
            E, 0, 1.0, int(horizon), float(tau), np.zeros(1),
        )
    T = np.zeros((L, E, E)) if prior is None else prior.copy()
    pair_ptr, pair_prev, pair_cur = work.pairs
    return Learner(
        T, work.top1, pair_ptr, pair_prev, pair_cur,
        E, int(decay_every), float(decay), int(horizon), float(tau), np.zeros(4 * E),
    )


def parse_threshold(threshold, num_experts: int) -> float:
    """tau from a number or ``"<x>/E"`` (x times the uniform baseline 1/E); must lie in [0, 1].

    >>> parse_threshold("2/E", 8), parse_threshold(0.1, 8)
    (0.25, 0.1)
    """
    if isinstance(threshold, str):
        text = threshold.strip()
        try:
            if text.upper().endswith("/E"):
                value = float(text[:-2] or 1.0) / num_experts
            else:
                value = float(text)
        except ValueError:
            raise SimcacheError(f"threshold must be a number or '<x>/E', got {threshold!r}") from None
    else:
        value = float(threshold)
    if not (0.0 <= value <= 1.0) or value != value:
        raise SimcacheError(f"threshold {threshold} is outside [0, 1]")
    return value
