"""The expert-cache simulator: one loop, small policies (docs/design.md, "Cache semantics").

For each (step, layer) group, in execution order:

1. demanded residents are hits and are pinned for this group;
2. in expert order, hits are touched and each miss asks the admission rule: admitted -> a
   free slot, else the eviction rule's victim among unpinned residents, then a fill;
   refused -> a bypass (streamed through a transient buffer; the cache and its order are
   untouched); admitted but every resident pinned -> a forced bypass;
3. every miss is one expert load over PCIe.

The bookkeeping lives once, in :func:`_run`; a policy only answers ``victim`` and ``admit``
(and keeps its own order on access and eviction); see :mod:`simcache.policies.registry`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from simcache import _checks
from simcache._jit import kernel as jit
from simcache.errors import SimcacheError
from simcache.policies import _dispatch as dispatch
from simcache.policies import learner_for, needs_future, policy_name, resolve
from simcache.state import Learner, new_state
from simcache.timing import Calibration, default_calibration, group_seconds, group_table_for
from simcache.trace import Trace
from simcache.workload import RECORDED, Workload

SCOPES = ("layer", "global")

# The counters, declared once: the kernel's columns (in this order), SimResult's attributes,
# to_dict, per_layer and docs/metrics.md come from this table.
COUNTERS = {
    "hits": "accesses whose expert was resident",
    "fills": "misses admitted into a slot (a load)",
    "bypasses": "misses refused by admission, streamed past the cache (a load)",
    "forced_bypasses": "misses admitted while every resident was pinned (a load)",
    "evictions": "residents given up for a fill",
    "reloads": "fills of an expert that had been evicted before",
    "accesses": "(step, layer, distinct expert) demands",
}
HITS, FILLS, BYPASSES, FORCED_BYPASSES, EVICTIONS, RELOADS, ACCESSES = range(len(COUNTERS))
# decision codes of a recorded access: its outcome, the first four counter columns
HIT, FILL, BYPASS, FORCED_BYPASS = HITS, FILLS, BYPASSES, FORCED_BYPASSES
# per-layer seconds, declared once like the counters
TIMES = {
    "compute_s": "GPU FFN time of every demanded expert",
    "transfer_s": "copy time of every load",
    "time_s": "predicted time of the groups (copies overlapping compute if the calibration says so)",
}
COMPUTE_S, TRANSFER_S, TIME_S = range(len(TIMES))

CHUNK_ACCESSES = 4_000_000  # accesses per kernel call between progress updates


@jit
def _run(
    g0, g1, group_ptr, tokens, L, per_layer, S, M,
    evict, admit, learner, future_tag, record_tag,
    counters, layer_time, t_copy, ffn_lut, overlap, group_n, group_t, group_s, group_fixed,
    out_outcome, out_slot, out_victim, out_group_time,
):
    """Serve groups g0..g1-1. Per access it counts the outcome (counters[layer, outcome]),
    evictions and reloads; per group it adds the accesses (counters[layer, ACCESSES]) and
    the group's compute, transfer and predicted time (layer_time[layer, :]).

    The policy codes and the flags arrive as tuples whose length is the value
    (:func:`simcache.policies._dispatch.tag`), so each policy pair compiles to its own
    specialisation in which the dispatch and unused bookkeeping fold away.
    """
    record = len(record_tag) == 2
    has_future = len(future_tag) == 2
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
                dispatch.on_access(evict, S, M, slot, i, False)
                counters[l, HITS] += 1
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
            if dispatch.admit(admit, S, M, pool, i, hi, stamp):
                outcome = FORCED_BYPASS
                if S.used[pool] < S.cap[pool]:
                    slot = S.base[pool] + S.used[pool]
                    S.used[pool] += 1
                else:
                    slot = dispatch.victim(evict, S, M, pool, i, stamp)
                    if slot >= 0:
                        gone = S.slot_key[slot]
                        dispatch.on_evict(evict, S, M, slot, i)
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
                    dispatch.on_access(evict, S, M, slot, i, True)
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
        layer_time[l, COMPUTE_S] += compute
        layer_time[l, TRANSFER_S] += transfer
        layer_time[l, TIME_S] += t
        if record:
            out_group_time[g] = t


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
    """Counters, bytes and predicted time of one simulation. See docs/metrics.md.

    Every counter of :data:`COUNTERS` is an attribute (its total over layers) and a
    ``per_layer`` array; so is every time of :data:`TIMES` (``None`` without expert bytes).
    """

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

    SETTINGS = ("policy", "evict", "admit", "capacity", "scope", "batch", "prefill", "threshold",
                "model", "num_layers", "num_experts", "top_k", "steps", "decode_tokens")

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
    def time_per_token_s(self) -> float | None:
        if self.time_s is None or not self.decode_tokens:
            return None
        return self.time_s / self.decode_tokens

    @property
    def tokens_per_s(self) -> float | None:
        if not self.time_s:
            return None
        return self.decode_tokens / self.time_s

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``per_layer=True`` adds the per-layer lists."""
        out = {name: getattr(self, name) for name in self.SETTINGS}
        out.update({name: getattr(self, name) for name in COUNTERS})
        out.update(loads=self.loads, hit_ratio=self.hit_ratio, expert_bytes=self.expert_bytes,
                   bytes_loaded=self.bytes_loaded)
        out.update({name: getattr(self, name) for name in TIMES})
        out.update(time_per_token_s=self.time_per_token_s, tokens_per_s=self.tokens_per_s,
                   calibration=self.calibration)
        if per_layer:
            out["per_layer"] = {k: v.tolist() for k, v in self.per_layer.items()}
        return out


def _counter(name):
    return property(lambda self: int(self.per_layer[name].sum()), doc=COUNTERS[name])


def _seconds(name):
    def get(self):
        return None if self.calibration is None else float(self.per_layer[name].sum())

    return property(get, doc=TIMES[name])


for _name in COUNTERS:
    setattr(SimResult, _name, _counter(_name))
for _name in TIMES:
    setattr(SimResult, _name, _seconds(_name))


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
        A preset (:data:`simcache.PRESETS`): ``lru``, ``belady``, ``belady-bypass``,
        ``markov``, ...
    capacity : int
        Slots per layer (``scope="layer"``) or in the one shared pool (``scope="global"``).
    scope : {"layer", "global"}
    batch : int
        Sequences decoding together (continuous batching).
    threshold : float or str
        Markov admission threshold tau in [0, 1]; ``"2/E"`` means 2 x the uniform baseline 1/E.
    evict, admit : str, optional
        Override the preset's eviction or admission rule (:data:`simcache.EVICTION`,
        :data:`simcache.ADMISSION`).
    prefill : {"skip", "step"}
        Skip prompt tokens, or run each prompt as one step.
    prior : array (layers, E, E), optional
        Transition counts that seed the Markov learner, fitted on a *separate* trace
        (:func:`simcache.transition_counts`).
    horizon : int
        Steps ahead for ``admit="markov-h"``.
    decay_every, decay : int, float
        The learner multiplies its counts by ``decay`` every ``decay_every`` steps.
    seed : int
        Seed of random eviction.
    calibration : Calibration, optional
        Transfer and compute tables; default: the H200 reference figures.
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
    # argument checks: one-line errors, no truncation (simcache._checks)
    policy, evict, admit = (None if v is None else _checks.text(n, v)
                            for n, v in (("policy", policy), ("evict", evict), ("admit", admit)))
    capacity = _checks.optional_integer("capacity", capacity, 1)
    batch = batch if batch == RECORDED else _checks.integer("batch", batch, 1)
    horizon = _checks.integer("horizon", horizon, 1)
    seed = _checks.integer("seed", seed, 0, _checks.UINT64_MAX)
    decay_every, decay = _checks.integer("decay_every", decay_every, 0), _checks.number("decay", decay)
    expert_bytes = _checks.optional_integer("expert_bytes", expert_bytes, 1, _checks.EXACT_FLOAT_MAX)
    if calibration is not None:
        _checks.instance("calibration", calibration, Calibration, "Calibration (simcache.load_calibration)")
    overlap = None if overlap is None else _checks.flag("overlap", overlap)
    record = _checks.flag("record", record)
    eviction, admission = resolve(policy, evict, admit)
    work = _workload(trace, batch, prefill)
    L, E = work.trace.num_layers, work.trace.num_experts
    _check_capacity(capacity, scope, L, E)
    tau = parse_threshold(threshold, E)
    prior = _check_prior(prior, L, E)
    if horizon < 1:
        raise SimcacheError(f"horizon must be >= 1, got {horizon}")
    if decay_every < 0 or not (0.0 < decay <= 1.0):
        raise SimcacheError("decay must be in (0, 1] and decay_every >= 0")

    future = needs_future(eviction, admission)
    S = new_state(
        keys=work.demand.keys, future=work.future if future else np.zeros(0, np.int64),
        num_layers=L, num_experts=E, pool_caps=[capacity] * L if scope == "layer" else [capacity],
        rules=(eviction, admission), seed=seed, workload=work,
    )
    learner = learner_for(eviction, admission)
    horizon = min(horizon, work.steps.num_steps)  # no step lies beyond the trace's end
    M = _learner(work, prior, tau, horizon, decay_every, decay, active=learner != 0)
    eb, cal_name, t_copy, lut, ov = _timing(work, calibration, expert_bytes, overlap)
    group_table = group_table_for(calibration, eb)

    n_groups = work.demand.group_ptr.shape[0] - 1
    counters = np.zeros((L, len(COUNTERS)), np.int64)
    layer_time = np.zeros((L, len(TIMES)), np.float64)
    rec = _records(work.demand.num_accesses if record else 0, n_groups if record else 0)
    tags = (dispatch.tag(eviction.code), dispatch.tag(admission.code), dispatch.tag(learner),
            dispatch.tag(int(future)), dispatch.tag(int(record)))
    start = time.perf_counter()
    for g0, g1 in _chunks(work.demand.group_ptr):
        _run(
            g0, g1, work.demand.group_ptr, work.demand.tokens, L, scope == "layer", S, M, *tags,
            counters, layer_time, t_copy, lut, ov, *group_table, *rec,
        )
        if progress is not None:
            progress(int(work.demand.group_ptr[g1] - work.demand.group_ptr[g0]))
    elapsed = time.perf_counter() - start

    per_layer = {name: counters[:, j].copy() for j, name in enumerate(COUNTERS)}
    per_layer.update({name: layer_time[:, j].copy() for j, name in enumerate(TIMES)})
    return SimResult(
        policy=policy_name(eviction.name, admission.name),
        evict=eviction.name,
        admit=admission.name,
        capacity=int(capacity),
        scope=scope,
        batch=work.batch,
        prefill=work.prefill,
        threshold=tau if "threshold" in eviction.knobs + admission.knobs else None,
        model=work.trace.model,
        num_layers=L,
        num_experts=E,
        top_k=work.trace.top_k,
        expert_bytes=eb,
        steps=work.steps.num_steps,
        decode_tokens=work.steps.decode_tokens,
        per_layer=per_layer,
        calibration=cal_name,
        elapsed_s=elapsed,
        decisions=Decisions(*rec) if record else None,
    )


# ---- the steps of simulate() -----------------------------------------------------------------


def _workload(trace, batch, prefill) -> Workload:
    if isinstance(trace, Workload):
        return trace
    if isinstance(trace, Trace):
        return Workload(trace, batch, prefill)
    raise SimcacheError(f"simulate needs a Trace or Workload, got {type(trace).__name__}")


def _check_capacity(capacity, scope, L, E):
    if scope not in SCOPES:
        raise SimcacheError(f"scope must be 'layer' or 'global', got {scope!r}")
    if capacity is None:
        raise SimcacheError("capacity is required")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity <= 0:
        raise SimcacheError(f"capacity must be a positive integer, got {capacity!r}")
    in_scope = E if scope == "layer" else L * E
    if capacity > in_scope:
        where = "per layer" if scope == "layer" else "in the global pool"
        raise SimcacheError(
            f"capacity {capacity} exceeds the {in_scope} experts {where} (num_experts={E}, layers={L})"
        )


def _check_prior(prior, L, E):
    if prior is None:
        return None
    prior = np.asarray(prior)
    if prior.shape != (L, E, E):
        raise SimcacheError(f"prior has shape {prior.shape}, the trace needs ({L}, {E}, {E})")
    return _checks.counts("prior counts", prior)


def _timing(work: Workload, calibration, expert_bytes, overlap):
    """(expert bytes, calibration name, copy seconds, FFN seconds by token count, overlap)."""
    eb = int(expert_bytes) if expert_bytes is not None else work.trace.expert_bytes
    if eb is not None and eb <= 0:
        raise SimcacheError(f"expert_bytes must be positive, got {eb}")
    cal = calibration if calibration is not None else default_calibration()
    ov = cal.overlap if overlap is None else bool(overlap)
    if eb is None:
        return None, None, 0.0, np.zeros(work.max_tokens + 1), ov
    lut = cal.ffn_seconds_for(np.arange(work.max_tokens + 1), eb)
    return eb, cal.device, cal.copy_seconds(eb), lut, ov


def _records(accesses: int, groups: int):
    """The decision log's arrays (outcome, slot, victim per access; time per group); one
    element each when not recording."""
    n, g = max(accesses, 1), max(groups, 1)
    return (np.full(n, -1, np.int8), np.full(n, -1, np.int32), np.full(n, -1, np.int32),
            np.zeros(g, np.float64))


def _chunks(group_ptr):
    """(g0, g1) group ranges of about CHUNK_ACCESSES accesses, for progress updates."""
    n_groups = group_ptr.shape[0] - 1
    g = 0
    while g < n_groups:
        g_end = int(min(np.searchsorted(group_ptr, group_ptr[g] + CHUNK_ACCESSES, side="right"), n_groups))
        g_end = max(g_end, g + 1)
        yield g, g_end
        g = g_end


def _learner(work: Workload, prior, tau, horizon, decay_every, decay, active) -> Learner:
    L, E = work.trace.num_layers, work.trace.num_experts
    common = dict(E=E, decay_every=int(decay_every), decay=float(decay), horizon=int(horizon),
                  tau=float(tau))
    if not active:
        z64 = np.zeros(1, np.int64)
        return Learner(T=np.zeros((1, 1, 1)), top1=np.zeros((1, 1), np.int16), pair_ptr=z64,
                       pair_prev=z64, pair_cur=z64, work=np.zeros(1), **common)
    pair_ptr, pair_prev, pair_cur = work.pairs
    return Learner(T=np.zeros((L, E, E)) if prior is None else prior.copy(), top1=work.top1,
                   pair_ptr=pair_ptr, pair_prev=pair_prev, pair_cur=pair_cur,
                   work=np.zeros(4 * E), **common)


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
        value = _checks.number("threshold", threshold)
    if not (0.0 <= value <= 1.0) or value != value:
        raise SimcacheError(f"threshold {threshold} is outside [0, 1]")
    return value
