"""The expert-cache simulator: one loop, small policies (docs/design.md, "Cache semantics").

For each (step, layer) group, in execution order:

1. demanded residents are hits and are pinned for this group;
2. in expert order, hits are touched and each miss asks the admission rule: admitted -> a
   free slot, else the eviction rule's victim among unpinned residents, then a fill;
   refused -> a bypass (streamed through a transient buffer; the cache and its order are
   untouched); admitted but every resident pinned -> a forced bypass;
3. every miss is one expert load over PCIe -- or, with ``--miss cpu|auto`` (docs/design.md §11), some
   misses are computed on the host CPU instead: no load, the cache untouched
   (:mod:`simcache.hybrid` decides which, per group, and prices the group).

The bookkeeping lives once, in :func:`_run`; a policy only answers ``victim`` and ``admit``
(and keeps its own order on access and eviction); see :mod:`simcache.policies.registry`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from simcache import _checks
from simcache import hybrid
from simcache import prefetch as pf
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
    "cpu_experts": "misses computed on the host CPU (--miss cpu|auto; no load)",
    "prefetched": "accesses served from a prefetch buffer (a prefetch admission refused)",
    "evictions": "residents given up for a fill or a prefetch",
    "reloads": "fills of an expert that had been evicted before",
    "accesses": "(step, layer, distinct expert) demands",
    "cpu_tokens": "tokens of the experts computed on the host CPU",
    "prefetches": "prefetch copies issued (docs/prefetch.md)",
    "prefetch_used": "prefetched experts demanded before being evicted (or from their buffer)",
}
(HITS, FILLS, BYPASSES, FORCED_BYPASSES, CPU_EXPERTS, PREFETCHED, EVICTIONS, RELOADS, ACCESSES,
 CPU_TOKENS, PREFETCHES, PREFETCH_USED) = range(len(COUNTERS))
# decision codes of a recorded access: its outcome, the first six counter columns
HIT, FILL, BYPASS, FORCED_BYPASS, CPU = HITS, FILLS, BYPASSES, FORCED_BYPASSES, CPU_EXPERTS
# per-layer seconds, declared once like the counters
TIMES = {
    "compute_s": "GPU FFN time of the experts the GPU computes (hits and copied misses; gpu_s)",
    "transfer_s": "copy-engine time of every load, at its concurrent rate beside CPU work (copy_s)",
    "cpu_s": "CPU path time: host FFN and activation round trip of each CPU expert, and each CPU group's hand-off",
    "time_s": "predicted time of the groups (max of the GPU path, copies overlapping compute if "
              "the calibration says so, and the CPU path)",
    "stall_s": "time the GPU waited on copies on the prefetch timeline (time_s - compute_s)",
}
COMPUTE_S, TRANSFER_S, CPU_S, TIME_S, STALL_S = range(len(TIMES))
GPU_S, COPY_S = COMPUTE_S, TRANSFER_S  # the executors' names for the same columns (docs/design.md §11)

CHUNK_ACCESSES = 4_000_000  # accesses per kernel call between progress updates


@jit
def _run(
    g0, g1, group_ptr, tokens, L, per_layer, S, M,
    evict, admit, learner, future_tag, record_tag, miss_tag, grouped_tag,
    counters, layer_time, t_copy, ffn_lut, overlap, group_n, group_t, group_s, group_fixed, H,
    out_outcome, out_slot, out_victim, out_group_time, P, prefetch_tag,
):
    """Serve groups g0..g1-1. Per access it counts the outcome (counters[layer, outcome]),
    evictions and reloads; per group it adds the accesses (counters[layer, ACCESSES]) and
    the group's compute, transfer and predicted time (layer_time[layer, :]; the stall column
    and, with --miss load, the transfer column are filled in once after the loop:
    :func:`_derived_times`).

    The policy codes and the flags arrive as tuples whose length is the value
    (:func:`simcache.policies._dispatch.tag`), so each policy pair compiles to its own
    specialisation in which the dispatch and unused bookkeeping fold away.
    """
    record = len(record_tag) == 2
    has_future = len(future_tag) == 2
    miss = len(miss_tag) - 1  # hybrid.LOAD, CPU, AUTO or AUTO_CPUTIME
    hybrid_mode = miss != hybrid.LOAD
    prefetching = len(prefetch_tag) == 2  # on the copy-engine timeline (simcache.prefetch)
    grouped = len(grouped_tag) == 2  # a grouped FFN table prices the group (timing.group_seconds)
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
        if prefetching:  # the prefetch in flight (its slot is being written) is pinned
            pf.begin(P.T)
            if P.live[1] >= 0 and S.where[P.live[1]] >= 0 and P.T.arrival[P.live[1]] > P.T.clock[0]:
                S.pin[S.where[P.live[1]]] = stamp
        # 1. demanded residents are hits, pinned for this group: no miss may evict them.
        # Branch-free: an absent key's slot -1 pins the spare last entry of S.pin (a branch
        # here mispredicts on every other access: -20% accesses/s).
        if hybrid_mode:  # pins too, then splits the misses between copy and CPU
            hybrid.plan(H, S, tokens, lo, hi, stamp, ffn_lut, t_copy, overlap, miss)
        elif hi - lo > 1 or prefetching:  # (a lone access has no other miss to protect itself
            # from, but has a prefetch starting while it computes)
            for i in range(lo, hi):
                S.pin[S.where[S.keys[i]]] = stamp
        # 2. in expert order: hits are touched, misses ask admission and eviction. Touching
        # hits and fills in one order that does not depend on which were hits keeps LRU a
        # stack algorithm (hits never fall as capacity grows).
        loads = 0
        misses = 0
        compute = 0.0
        last_miss = 0.0
        group_tokens = 0
        load_tokens = 0
        for i in range(lo, hi):
            key = S.keys[i]
            cost = ffn_lut[tokens[i]]
            compute += cost
            if grouped:
                group_tokens += tokens[i]
            slot = S.where[key]
            if slot >= 0:  # a hit (misses of this group are filled only at their own index;
                # pass 1 pinned it, or it is the group's only access)
                if has_future:
                    S.nu[slot] = S.future[i]
                dispatch.on_access(evict, S, M, slot, i, False)
                counters[l, HITS] += 1
                if prefetching:  # (inline: a call per hit passing P costs 4x accesses/s)
                    if P.unused[key]:
                        P.unused[key] = False
                        P.counts[l, pf.USED] += 1
                    if P.T.arrival[key] > P.T.clock[0]:
                        pf.use(P.T, key, cost)
                if record:
                    out_outcome[i] = HIT
                    out_slot[i] = slot - S.base[pool]
                    out_victim[i] = -1
                continue
            if hybrid_mode:
                misses += 1
            if hybrid_mode and H.to_cpu[misses - 1]:  # on the host: no load, cache untouched
                counters[l, CPU_EXPERTS] += 1
                counters[l, CPU_TOKENS] += tokens[i]
                if record:
                    out_outcome[i] = CPU
                    out_slot[i] = -1
                    out_victim[i] = -1
                continue
            if prefetching:
                b = pf.buffered(P, key, g, cost, l) if P.live[0] > 0 else -1
                if b >= 0:
                    if record:
                        out_outcome[i] = PREFETCHED
                        out_slot[i] = b
                        out_victim[i] = -1
                    continue
                pf.demand(P.T, key, cost)
            loads += 1
            last_miss = cost
            if grouped:
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
                        if prefetching:
                            P.unused[gone] = False
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
        # expert can only compute after its copy; without overlap the two add up. Hybrid
        # groups were priced by hybrid.split (the same rule, with a CPU path beside it).
        counters[l, ACCESSES] += hi - lo
        if hybrid_mode:
            t = H.out[hybrid.TOTAL_S]
            compute = H.out[hybrid.GPU_S]
            layer_time[l, GPU_S] += compute
            layer_time[l, COPY_S] += H.out[hybrid.COPY_S]
            layer_time[l, CPU_S] += H.out[hybrid.CPU_S]
        else:
            transfer = loads * t_copy
            if prefetching:  # the same rule on the timeline, with copies crossing groups (never
                # with a grouped FFN table: refused in _prefetch_plan)
                for r in range(P.ptr[g], P.ptr[g + 1]):
                    pf.request(P.T, P.keys[r], g + P.distance, g)
                if record:
                    P.group[g, 0] = P.T.clock[0]
                t = pf.end(P.T, compute, overlap)
                if record:
                    P.group[g, 1] = t - compute
                if P.live[0] > 0 or pf.next_start(P.T) >= 0:
                    pf.advance(P, S, M, evict, admit, per_layer, S.where.shape[0] // L, g, hi, stamp, record)
            elif grouped:  # a grouped FFN table: the replay's fast issue path
                compute, t = group_seconds(group_n, group_t, group_s, group_fixed, hi - lo - loads,
                                           group_tokens - load_tokens, loads, load_tokens, transfer, overlap)
            elif overlap:
                t = max(compute, transfer + last_miss)
            else:
                t = compute + transfer
            layer_time[l, GPU_S] += compute
        layer_time[l, TIME_S] += t
        if record:
            out_group_time[g] = t


# ---- results -------------------------------------------------------------------------------


@dataclass
class Decisions:
    """Per access: outcome code (0 hit, 1 fill, 2 bypass, 3 forced bypass, 4 computed on the
    host CPU), slot inside its
    pool (hits and fills, else -1) and the evicted key (fills that evicted, else -1); per
    (step, layer) group: the predicted time in seconds."""

    outcome: np.ndarray
    slot: np.ndarray
    victim: np.ndarray
    group_time: np.ndarray
    # with prefetch (docs/prefetch.md): per group [start, stall] on the timeline; every issued
    # prefetch as [after group, key, slot in its pool or -1, prefetch buffer or -1]; outcome 5
    # (PREFETCHED) = served from prefetch buffer ``slot``
    group_timeline: np.ndarray | None = None
    prefetch_schedule: np.ndarray | None = None


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
    prefetch: str = "none"
    prefetch_width: int | None = None

    miss: str = "load"

    SETTINGS = ("policy", "evict", "admit", "capacity", "scope", "batch", "prefill", "threshold",
                "miss", "prefetch", "prefetch_width", "model", "num_layers", "num_experts", "top_k",
                "steps", "decode_tokens")

    @property
    def gpu_s(self) -> float | None:
        """GPU FFN seconds (hits and copied experts): :attr:`compute_s` by its executor's name."""
        return self.compute_s

    @property
    def copy_s(self) -> float | None:
        """Copy-engine seconds: :attr:`transfer_s` by its executor's name."""
        return self.transfer_s

    @property
    def loads(self) -> int:
        """Expert loads over PCIe: every miss, admitted or bypassed."""
        return self.fills + self.bypasses + self.forced_bypasses

    @property
    def bytes_loaded(self) -> int | None:
        return None if self.expert_bytes is None else self.loads * self.expert_bytes

    @property
    def prefetch_wasted(self) -> int:
        """Prefetches never demanded before being evicted (or in their buffer)."""
        return self.prefetches - self.prefetch_used

    @property
    def bytes_copied(self) -> int | None:
        """Every copy: demand loads and prefetches."""
        return None if self.expert_bytes is None else (self.loads + self.prefetches) * self.expert_bytes

    @property
    def prefetch_wasted_bytes(self) -> int | None:
        return None if self.expert_bytes is None else self.prefetch_wasted * self.expert_bytes

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
                   bytes_loaded=self.bytes_loaded, prefetch_wasted=self.prefetch_wasted,
                   prefetch_wasted_bytes=self.prefetch_wasted_bytes, bytes_copied=self.bytes_copied)
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
    prefetch: "str | pf.Plan" = "none",
    prefetch_width: int | None = None,
    record: bool = False,
    progress: Callable[[int], None] | None = None,
    miss: str = "load",
    train_demand: np.ndarray | None = None,
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
    prefetch : {"none", "oracle", "lookahead", "markov"} or Plan
        Prefetch on the copy-engine timeline (docs/prefetch.md); a :class:`simcache.prefetch.Plan`
        made once by :func:`simcache.prefetch.plan` may be passed instead.
    prefetch_width : int, optional
        Experts requested per predicted group (default: top_k).
    record : bool
        Keep every access's decision (``result.decisions``).
    progress : callable, optional
        Called with the number of accesses done after each chunk.
    miss : {"load", "cpu", "auto", "auto-cputime"}
        Who serves a miss (docs/design.md §11, :mod:`simcache.hybrid`): ``load`` copies every miss;
        ``cpu`` computes every miss on the host CPU; ``auto`` splits each group's misses
        between the two to minimise its time. ``cpu`` and ``auto`` need a calibration with a
        CPU table (the default has one).
    train_demand : array (layers, E), optional
        How often each expert was routed to in *training* data (:func:`demand_counts` of a
        separate split), for rules that place experts up front (``evict="static"``); without
        it, the column sums of ``prior`` are used.

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
    if eviction.place is not None:
        eviction.place(S, _check_demand(train_demand, prior, L, E, eviction.name), scope == "layer")
    the_plan = _prefetch_plan(work, prefetch, prefetch_width, eviction, admission, expert_bytes,
                              calibration, overlap, prior, decay_every, decay)
    eb, cal_name, t_copy, lut, ov = _timing(work, calibration, expert_bytes, overlap)
    H, mode = _hybrid(work, miss, calibration, eb)
    if the_plan is not None and mode != hybrid.LOAD:
        raise SimcacheError(f"--prefetch {prefetch} with --miss {miss} is not modelled: prefetch "
                            f"runs with --miss load")
    group_table = group_table_for(calibration, eb)

    n_groups = work.demand.group_ptr.shape[0] - 1
    if the_plan is None:
        P = pf.no_prefetching(L)
    else:  # one spare access at the end of the keys: prefetches ask admission through it
        S = S._replace(keys=np.append(S.keys, S.keys[:1]))
        P = pf.new_prefetching(the_plan, L * E, L, t_copy, n_groups, record)
    counters = np.zeros((L, len(COUNTERS)), np.int64)
    layer_time = np.zeros((L, len(TIMES)), np.float64)
    rec = _records(work.demand.num_accesses if record else 0, n_groups if record else 0)
    tags = (dispatch.tag(eviction.code), dispatch.tag(admission.code), dispatch.tag(learner),
            dispatch.tag(int(future)), dispatch.tag(int(record)), dispatch.tag(mode),
            dispatch.tag(int(group_table[2].shape[0] > 0)))
    prefetch_tag = dispatch.tag(int(the_plan is not None))
    start = time.perf_counter()
    for g0, g1 in _chunks(work.demand.group_ptr):
        _run(
            g0, g1, work.demand.group_ptr, work.demand.tokens, L, scope == "layer", S, M, *tags,
            counters, layer_time, t_copy, lut, ov, *group_table, H, *rec, P, prefetch_tag,
        )
        if progress is not None:
            progress(int(work.demand.group_ptr[g1] - work.demand.group_ptr[g0]))
    elapsed = time.perf_counter() - start
    loads = counters[:, FILLS] + counters[:, BYPASSES] + counters[:, FORCED_BYPASSES]
    _derived_times(layer_time, loads if mode == hybrid.LOAD else None, t_copy)

    decisions = Decisions(*rec) if record else None
    if the_plan is not None:
        for j, name in enumerate(pf.COUNTS):
            counters[:, list(COUNTERS).index(name)] += P.counts[:, j]
        if record:
            decisions.group_timeline = P.group
            decisions.prefetch_schedule = P.sched[: P.live[2]].copy()
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
        decisions=decisions,
        miss=miss,
        prefetch="none" if the_plan is None else the_plan.predictor,
        prefetch_width=None if the_plan is None else the_plan.width,
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


def _hybrid(work: Workload, miss, calibration, eb):
    """The hybrid tables and scratch (:func:`simcache.hybrid.new_hybrid`) and the miss code."""
    mode = hybrid.miss_code(miss)
    if eb is None and mode in (hybrid.AUTO, hybrid.AUTO_CPUTIME):
        raise SimcacheError(f"--miss {miss} prices each group, so it needs expert bytes (pass --expert-bytes)")
    gp = work.demand.group_ptr
    # (--miss load never reads the scratch: no group-sized temporary for it, 0.4 GB at 100 M accesses)
    max_group = int(np.diff(gp).max()) if gp.shape[0] > 1 and mode != hybrid.LOAD else 1
    cal = calibration if calibration is not None else default_calibration()
    return hybrid.new_hybrid(cal if eb is not None else None, eb, work.max_tokens, max_group, miss), mode


def _check_demand(train_demand, prior, L, E, rule):
    """The (layers, E) demand counts a placing rule ranks experts by: ``train_demand``, else
    the prior's column sums (how often each expert was a next token's top-1)."""
    if train_demand is None and prior is None:
        raise SimcacheError(f"eviction '{rule}' places the most-demanded experts of training data: "
                            f"give a training split (--split) or a prior (--prior), never the scored requests")
    counts = np.asarray(train_demand if train_demand is not None else prior.sum(axis=1), dtype=np.float64)
    if counts.shape != (L, E):
        raise SimcacheError(f"training demand has shape {counts.shape}, the trace needs ({L}, {E})")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise SimcacheError("training demand counts must be finite and non-negative")
    return counts


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


def _prefetch_plan(work, prefetch, width, eviction, admission, expert_bytes, calibration, overlap,
                   prior, decay_every, decay):
    """The prefetch plan asked for (None for none), after checking it can be simulated."""
    if prefetch is None or (isinstance(prefetch, str) and prefetch == "none"):
        return None
    name = prefetch.predictor if isinstance(prefetch, pf.Plan) else prefetch
    if not isinstance(name, str) or name not in pf.PREDICTORS:
        raise SimcacheError(f"unknown prefetch predictor {name!r} (choose from {', '.join(pf.PREDICTORS)})")
    cal = calibration if calibration is not None else default_calibration()
    eb = expert_bytes if expert_bytes is not None else work.trace.expert_bytes
    overlap = cal.overlap if overlap is None else bool(overlap)
    if eb is None:
        raise SimcacheError("prefetch needs expert_bytes (from the trace or --expert-bytes) to time its copies")
    if not cal.copy_bytes or not cal.copy_gbps:
        raise SimcacheError(f"prefetch needs copy figures, and the calibration ({cal.device}) has none")
    if not overlap:
        raise SimcacheError("prefetch needs a copy stream: it cannot run with overlap off")
    if cal.group_ffn:  # the timeline prices experts one by one, as the eager issue path runs them
        raise SimcacheError("prefetch prices experts one by one: use a calibration probed with "
                            "--issue eager (this one holds the fast path's grouped FFN table)")
    if needs_future(eviction, admission):
        raise SimcacheError(f"prefetch does not run with {eviction.name} eviction / {admission.name} "
                            "admission (a prefetched expert has no next-use rank)")
    if isinstance(prefetch, pf.Plan):
        if prefetch.ptr.shape[0] != work.demand.group_ptr.shape[0]:
            raise SimcacheError("the prefetch plan was made for another workload")
        return prefetch
    w = work.trace.top_k if width is None else width
    return pf.plan(work, name, w, prior=prior, decay_every=decay_every, decay=decay)


def _derived_times(layer_time, loads=None, t_copy=0.0):
    """The per-layer time columns that follow from the others, filled in once after the loop
    instead of per group (two fewer writes of ``layer_time`` per group; docs/performance.md):
    stall = time - compute (:data:`TIMES`), and, given each layer's ``loads`` (``--miss load``:
    every load is one copy of ``t_copy`` seconds), transfer = loads x t_copy. Hybrid groups
    price their copies at the concurrent rate, per group, in the loop."""
    if loads is not None:
        layer_time[:, TRANSFER_S] = loads * t_copy
    layer_time[:, STALL_S] = layer_time[:, TIME_S] - layer_time[:, COMPUTE_S]


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
