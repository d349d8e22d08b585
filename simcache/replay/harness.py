"""Replay a policy's decisions on a real GPU with real-shaped expert tensors (docs/design.md §6, §15).

The simulator decides (hit / fill into slot s evicting v / bypass, for every access); the
replay carries the decisions out and measures them, in three steps:

1. **schedule** (:mod:`simcache.replay.schedule`): the decisions of the replayed steps and
   layers as named arrays: per (step, layer) group its computes (hits, then loads in load
   order), the GPU buffer and host row of each, and the tokens routed to each;
2. **issue** (:mod:`simcache.replay.issue`): every (layer, expert) is one row of one pinned
   host buffer (:class:`~simcache.replay.experts.ExpertStore`), the GPU holds one weights
   tensor of the simulated cache's slots and a ring of bypass buffers; loads are one copy each
   on a copy stream; the compute runs eagerly expert by expert (``eager``) or as two grouped
   GEMM calls per group (``fast``, the default on CUDA);
3. **measure** (:mod:`simcache.replay.measure`): events per group and per copy, host clocks
   per group.

With ``miss="cpu"|"auto"`` (docs/design.md §11) the simulator sends some misses to the host
CPU; the replay computes them there for real (:class:`~simcache.replay.cpu.HostExecutor`, at
the calibration's thread count, activations copied down and back) while the GPU streams
proceed, and reports the CPU path's measured seconds per expert beside the probe's.

It reports measured time per token, bytes moved, achieved GB/s per copy, the time compute
waited for copies, the host time spent issuing each (step, layer) and the GPU's idle time
between groups, beside the simulator's prediction for exactly the replayed steps and layers.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import simcache
from simcache.errors import SimcacheError
from simcache.replay import ISSUE_PATHS, QUANTISED
from simcache.replay.experts import (DTYPES, ExpertStore, gpu_free_bytes, host_available_bytes,
                                     pick_device, stored_format)
from simcache.replay.issue import ISSUERS, check_fast
from simcache.replay.measure import Meter, Timings
from simcache.replay import prefetch as rpf
from simcache.replay.presets import Preset
from simcache.replay.schedule import Schedule, build_schedule, check_ring, most_bypasses
from simcache.simulator import BYPASS, CPU, FILL, FORCED_BYPASS, HIT, PREFETCHED
from simcache.workload import Workload

# further simulate() settings a replay takes (a decision log's or a sweep cell's)
SIMULATE_OPTIONS = ("prefill", "prior", "seed", "horizon", "decay", "decay_every", "train_demand")


@dataclass
class ReplayResult:
    device: str
    preset: str
    dtype: str
    policy: str
    capacity: int
    scope: str
    batch: int
    layers: list[int]
    steps: int
    decode_tokens: int
    groups: int
    hits: int
    loads: int
    bypasses: int
    expert_bytes: int
    measured_s: float
    predicted_s: float
    copy_s: float
    stall_s: float
    copy_gbps_median: float
    copy_gbps_all: float
    host_issue_us_per_group: float
    issue: str = "eager"
    miss: str = "load"
    cpu_experts: int = 0
    expert_dtype: str | None = None
    idle_s: float = 0.0
    verified: bool | None = None
    max_abs_diff: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    outputs: list | None = field(default=None, repr=False)  # per timed group (n, H), if asked

    @property
    def bytes_moved(self) -> int:
        return self.loads * self.expert_bytes

    @property
    def measured_per_token_s(self) -> float:
        return self.measured_s / max(self.decode_tokens, 1)

    @property
    def predicted_per_token_s(self) -> float:
        return self.predicted_s / max(self.decode_tokens, 1)

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_s - self.measured_s) / self.measured_s if self.measured_s else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("extra", "outputs")}
        out.update(bytes_moved=self.bytes_moved, measured_per_token_s=self.measured_per_token_s,
                   predicted_per_token_s=self.predicted_per_token_s, prediction_error=self.error)
        out.update(self.extra)
        return out


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """``"0-3"``, ``"0,2,5"`` or None (all) -> sorted layer list, checked against the trace."""
    if text is None:
        return list(range(num_layers))
    layers = set()
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                layers.update(range(int(a), int(b) + 1))
            elif part.strip():
                layers.add(int(part))
    except ValueError:
        raise SimcacheError(f"--layers must look like 0-3 or 0,2,5, got {text!r}") from None
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise SimcacheError(f"--layers {text!r} names layers outside 0..{num_layers - 1}")
    return sorted(layers)


class Replayer:
    """Expert weights for the replayed layers, built once, and :meth:`run` to replay a policy
    with them (several policies, capacities and batch sizes reuse the same pinned buffer)."""

    def __init__(self, trace: simcache.Trace, preset: Preset, *, gpu: int | None = None,
                 device: str | None = None, dtype: str = "bfloat16", layers: str | None = None,
                 seed: int = 0, expert_dtype: str | None = None, issue: str | None = None):
        self.dev = pick_device(gpu, device)
        if dtype not in DTYPES:
            raise SimcacheError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        if expert_dtype is not None and expert_dtype not in QUANTISED:
            raise SimcacheError(f"--expert-dtype must be one of {', '.join(QUANTISED)}, got {expert_dtype!r}")
        self.expert_dtype = expert_dtype
        self.issue = issue if issue is not None else ("fast" if self.dev.type == "cuda" else "eager")
        if self.issue not in ISSUE_PATHS:
            raise SimcacheError(f"--issue must be one of {', '.join(ISSUE_PATHS)}, got {self.issue!r}")
        if self.issue == "fast":
            check_fast(self.dev, self.dtype)
        L, E = trace.num_layers, trace.num_experts
        if preset.name != "custom" and preset.num_experts != E:
            raise SimcacheError(f"preset {preset.name} has {preset.num_experts} experts per layer but the "
                                f"trace has {E}; choose a matching preset or --preset custom")
        if preset.name != "custom" and L > preset.num_layers:
            raise SimcacheError(f"the trace has {L} MoE layers, more than {preset.name}'s {preset.num_layers}")
        self.trace, self.preset = trace, preset
        self.layers = parse_layers(layers, L)
        stored, per = stored_format(expert_dtype, self.dtype)
        self.expert_bytes = preset.expert_elements() // per * torch.tensor([], dtype=stored).element_size()
        host_need = len(self.layers) * E * self.expert_bytes
        available = host_available_bytes()
        if host_need > 0.9 * available:
            fit = int(0.9 * available // (E * self.expert_bytes))
            raise SimcacheError(
                f"the experts of {len(self.layers)} layers need {host_need / 2**30:.1f} GiB of pinned host "
                f"memory, {available / 2**30:.1f} GiB is available: replay a subset with --layers "
                f"(about {fit} layers fit)")
        t0 = time.perf_counter()
        self.store = ExpertStore(preset, len(self.layers) * E, self.dtype, self.dev, seed, expert_dtype)
        self.setup_s = time.perf_counter() - t0
        self.key_row = {l * E + e: i * E + e for i, l in enumerate(self.layers) for e in range(E)}
        self._executor = None  # the host CPU executor, made on the first --miss cpu|auto run

    def host_executor(self, threads: int, max_tokens: int):
        """The :class:`~simcache.replay.cpu.HostExecutor` for CPU-assigned experts (one, kept)."""
        from simcache.replay.cpu import HostExecutor

        from simcache.replay.cpu import _cores

        ex = self._executor
        if ex is None or ex.threads != (threads or _cores()) or ex.max_rows < max_tokens:
            if ex is not None:
                ex.close()
            ex = self._executor = HostExecutor(self.preset.hidden, self.preset.ffn, self.dev, threads,
                                               max_tokens=max(max_tokens, 256), dtype=self.dtype)
        return ex

    def refresh_cpu(self, cal: simcache.Calibration, seconds: float,
                    miss: str = "cpu") -> tuple[simcache.Calibration, float]:
        """``cal`` with its host FFN prices rescaled to the host's rate now: the FFN of one
        expert of the replay's own store, on 1 and 16 tokens, timed on the host executor's
        worker (the probe's thread count) for about ``seconds``, against ``cal``'s price for
        the same (alone). Returns the rescaled calibration and the factor (the mean of the two
        ratios). For a host whose FFN rate drifts between the probe and the replay
        (docs/hybrid.md, run 9)."""
        from simcache.replay.probe import host_ffn_seconds

        if not seconds > 0:
            raise SimcacheError(f"--cpu-refresh needs a positive number of seconds, got {seconds!r}")
        cal.require_cpu(miss)
        tokens = (1, 16)
        ex = self.host_executor(cal.cpu_thread_choice, 16)
        rows = self.store.host  # (N, W): the experts the CPU path computes on
        now = ex.run(lambda: host_ffn_seconds(self.preset, self.dtype, tokens, min_seconds=seconds / len(tokens),
                                              max_calls=10_000, experts=rows))
        priced = cal.cpu_seconds_for(tokens, self.expert_bytes, busy=False)
        factor = float(np.mean(np.asarray(now) / priced))
        return cal.cpu_scaled(factor), factor

    def run(self, policy: str = "lru", capacity: int = 2, *, scope: str = "layer", batch: int = 1,
            threshold: float | str = 0.1, evict: str | None = None, admit: str | None = None,
            steps: int | None = None, bypass_buffers: int = 4,
            calibration: simcache.Calibration | None = None, decisions_file=None, verify: bool = False,
            warmup_steps: int = 2, keep_outputs: bool = False, miss: str = "load", prefetch: str = "none",
            prefetch_width: int | None = None, cpu_refresh: float = 0.0, **simulate_options) -> ReplayResult:
        """Simulate ``policy`` with the preset's expert size, then carry its decisions out and
        measure them. See the module docstring. ``miss`` is simulate's (``load``, ``cpu``,
        ``auto``, ``auto-cputime``); ``simulate_options`` (:data:`SIMULATE_OPTIONS`) go to
        :func:`simcache.simulate`. ``prefetch`` and ``prefetch_width`` are simulate's
        (docs/prefetch.md); the replay issues the simulator's prefetches on the copy stream
        (:mod:`simcache.replay.prefetch`, eager issue path only). ``cpu_refresh`` (seconds, for
        ``miss`` other than ``load``): first rescale the calibration's host FFN prices to the
        host's rate now (:meth:`refresh_cpu`); the prediction from the calibration as given is
        kept as ``predicted_from_probe_s``."""
        check_ring(bypass_buffers)
        refreshed = None
        if cpu_refresh and miss != "load":
            given = calibration if calibration is not None else simcache.default_calibration()
            calibration, factor = self.refresh_cpu(given, cpu_refresh, miss)
            refreshed = given, factor
        if miss != "load" and self.expert_dtype is not None:
            raise SimcacheError(f"--miss {miss} computes experts on the host in {self.dtype_name}; "
                                f"it does not run with --expert-dtype {self.expert_dtype}")
        if prefetch != "none" and self.issue != "eager":
            raise SimcacheError(f"--prefetch {prefetch} replays on the eager issue path (the timeline prices "
                                f"experts one by one): use --issue eager")
        simulate_options = dict(simulate_options, miss=miss, prefetch=prefetch, prefetch_width=prefetch_width)
        sim, work, model = _decide(self, policy, capacity, scope, batch, threshold, evict, admit, calibration,
                                   decisions_file, dict(simulate_options, miss=miss))
        n_steps = work.steps.num_steps if steps is None else min(int(steps), work.steps.num_steps)
        if n_steps <= warmup_steps:
            raise SimcacheError(f"replay needs more than {warmup_steps} steps (warm-up), got {n_steps}")
        groups = _groups(work, self.layers, n_steps, self.trace.num_layers)
        warm = [g for g in groups if g[0] < warmup_steps]
        timed = [g for g in groups if g[0] >= warmup_steps]
        # the fast path computes a group's loads in one call, so it needs a bypass buffer for
        # every bypass of a group; the eager path reuses a small ring inside a group
        ring = bypass_buffers
        if self.issue == "fast":
            ring = max(bypass_buffers, most_bypasses(sim.decisions, groups))
        L = self.trace.num_layers
        n_slots = capacity * L if scope == "layer" else capacity
        pf_sched = rpf.replay_schedule(sim.decisions, self.layers, L, self.trace.num_experts, n_steps * L)
        n_pf = pf_sched.buffers if pf_sched is not None else 0  # prefetch buffers: rows after the ring
        _check_gpu_memory(self, n_slots, ring, n_pf)
        weights = torch.empty((n_slots + ring + n_pf, self.store.Q), dtype=self.store.host.dtype,
                              device=self.dev)  # (B, Q)
        x = _activations(work, self.preset.hidden, self.dtype, self.dev)  # (n, H)
        delivery = None if pf_sched is None else rpf.Delivery(
            pf_sched, weights, n_slots + ring, self.store.host, self.key_row, sim.decisions, work.demand.keys,
            num_layers=L, num_experts=self.trace.num_experts, capacity=capacity, per_layer=scope == "layer",
            device=self.dev)

        late = None if pf_sched is None else rpf.delivered_accesses(sim.decisions, work.demand, pf_sched, n_steps * L)

        def schedule(gs):
            return build_schedule(work, sim.decisions, gs, self.key_row, num_experts=self.trace.num_experts,
                                  capacity=capacity, scope=scope, n_slots=n_slots, ring=ring,
                                  experts=self._experts, weights=self._weights, late=late)

        executor = None
        if sim.cpu_experts:
            threads = calibration.cpu_thread_choice if calibration is not None else 0
            executor = self.host_executor(threads, x.shape[0] * self.trace.top_k)
        _preload(self, work, sim.decisions, weights, capacity, scope)
        issuer = ISSUERS[self.issue]

        def copying(sched):  # an issue run of sched with the copies, prefetches included
            it = issuer(sched, weights, self.store.host, self.store, x, self.dev, executor)
            if delivery is not None:  # (the eager path, checked above)
                delivery.bind(sched, it.copies.stream)
                it.prefetch = delivery
            return it

        _issue(copying(schedule(warm)), self.dev)
        sched = schedule(timed)  # (the warm-up above is untimed)
        timed_issuer = copying(sched)
        outputs, timings = _issue(timed_issuer, self.dev, keep=verify or keep_outputs)
        pf_measured = None
        if delivery is not None:  # waits on prefetches are stall too
            pf_measured = delivery.measured()
            timings = dataclasses.replace(timings, stall_s=timings.stall_s + pf_measured["stall_s"])
        verified = max_diff = rel_error = None
        if verify:
            del weights
            resident = self.store.host.to(self.dev)  # (N, Q): every expert, no copies
            reference, _ = _issue(issuer(sched.resident(), resident, None, self.store, x, self.dev), self.dev,
                                  keep=True)
            diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(outputs, reference)]
            max_diff = max(diffs) if diffs else 0.0
            if int(sched.cpu.sum()):  # the host's GEMMs round differently from the GPU's
                num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(outputs, reference))
                den = sum(float(b.double().square().sum()) for b in reference)
                rel_error = (num / den) ** 0.5 if den > 0 else 0.0
                verified = rel_error <= CPU_TOLERANCE
            else:
                verified = all(torch.equal(a, b) for a, b in zip(outputs, reference))
            del resident
        result = _result(self, sim, work, sched, timed, timings, capacity, scope, n_steps, warmup_steps,
                         verified, max_diff, model)
        result.miss = miss
        if rel_error is not None:
            result.extra["verify_rel_error"] = rel_error
        if executor is not None:
            priced = calibration if calibration is not None else simcache.default_calibration()  # (simulate's)
            result.extra.update(_cpu_figures(self, sched, timed_issuer.cpu.tickets, priced, executor))
            result.extra["predicted_at_run_rate_s"] = at_run_rate(
                work, sim.decisions.outcome, timed, priced, result.extra["cpu_rate_factor"], self.expert_bytes)
        if refreshed is not None:  # the prediction from the calibration as given, beside the refreshed one
            again, _, _ = _decide(self, policy, capacity, scope, batch, threshold, evict, admit, refreshed[0], None,
                                  dict(simulate_options, miss=miss))
            result.extra.update({"cpu_refresh_factor": refreshed[1], "predicted_from_probe_s": float(
                again.decisions.group_time[_group_ids(timed, self.trace.num_layers)].sum())})
        result.extra.update(_prefetch_extra(self, sim, work, timed, timings, pf_measured, calibration, model))
        if keep_outputs:
            result.outputs = [o.cpu() for o in outputs]
        return result

    @functools.cached_property
    def _experts(self) -> np.ndarray:
        return self.trace.token_experts()  # (tokens, L, k)

    @functools.cached_property
    def _weights(self) -> np.ndarray:
        t = self.trace
        L, k = t.num_layers, t.top_k
        if t.weights is not None:
            return t.weights.reshape(t.num_tokens, L, k)  # (tokens, L, k)
        return np.full((t.num_tokens, L, k), 1.0 / k, np.float32)


# --verify with CPU-computed experts: the host's GEMMs accumulate in another order than the
# GPU's, so outputs agree to rounding, not bitwise: ||out - ref|| / ||ref|| over the timed
# groups must stay within this (bf16 operands land between 1e-3 and 1e-2)
CPU_TOLERANCE = 1e-2


def run_rate_factor(ffn_s, ffn_priced) -> float:
    """How fast the host FFN ran in a replay against the calibration's price for the same
    experts: the median over CPU experts of measured / priced FFN seconds (nan if none).

    >>> round(run_rate_factor([0.006, 0.009, 0.012], [0.008, 0.006, 0.008]), 6)   # ran 1.5x the price
    1.5
    """
    m, p = np.asarray(ffn_s, float), np.asarray(ffn_priced, float)
    if m.size == 0 or m.size != p.size:
        return float("nan")
    return float(np.median(m / p))


def at_run_rate(work, outcome, timed, cal, factor: float, expert_bytes: int) -> float:
    """The schedule that ran, priced again with the calibration's host FFN prices times
    ``factor`` (:func:`run_rate_factor`): every timed group's assignment as it was (hits, copied
    misses, CPU misses in expert order; :func:`simcache.hybrid.assigned_times`). It separates the
    timing model's error from the host's drift between probe and replay (docs/hybrid.md); at
    factor 1 it is the prediction itself. nan if there is no factor."""
    from simcache.hybrid import TOTAL_S, assigned, luts

    if not (np.isfinite(factor) and factor > 0) or cal is None or not cal.has_cpu:
        return float("nan")
    scaled = cal.cpu_scaled(factor)
    tokens = work.demand.tokens
    gpu, cpu, cpu_busy, t_copy, t_busy = luts(scaled, expert_bytes, int(tokens.max(initial=0)))  # (once)
    total = 0.0
    for _, _, lo, hi in timed:
        o, t = outcome[lo:hi], tokens[lo:hi]
        miss = o != HIT
        total += assigned(float(gpu[t[~miss]].sum()), t[miss], o[miss] == CPU, gpu, cpu, cpu_busy, t_copy, t_busy,
                          scaled.cpu_group_s, scaled.overlap)[TOTAL_S]
    return total


def _cpu_figures(rp: Replayer, sched: Schedule, tickets, cal, executor) -> dict:
    """The CPU path measured per expert and per group, beside the calibration's prices (its
    busy rate where the group also copies, alone otherwise)."""
    from simcache.hybrid import luts

    counts = np.diff(sched.route_ptr)  # (C,) tokens per compute
    top = int(counts.max(initial=1))
    pred_alone = pred_busy = None
    if cal is not None and cal.has_cpu:
        _, pred_alone, pred_busy, _, _ = luts(cal, rp.expert_bytes, top)
        n = np.arange(top + 1)  # the FFN part of those prices alone, for the run's rate factor
        ffn_alone, ffn_busy = (cal.cpu_seconds_for(n, rp.expert_bytes, busy=b) for b in (False, True))
    tokens, measured, ffn_s, predicted, ffn_priced = [], [], [], [], []
    group_cpu, group_wait = np.zeros(sched.num_groups), np.zeros(sched.num_groups)
    for g, ticket in tickets:
        busy = len(sched.loads(g)) > 0
        ffn_s += ticket.ffn_s
        group_wait[g] = ticket.wait_s
        for c, s in zip(sched.cpu_computes(g), ticket.expert_s):
            t = int(counts[c])
            tokens.append(t)
            measured.append(s)
            if pred_alone is not None:
                predicted.append(float((pred_busy if busy else pred_alone)[t]))
                ffn_priced.append(float((ffn_busy if busy else ffn_alone)[t]))
        group_cpu[g] = ticket.path_s
    m = np.asarray(measured)
    rate = run_rate_factor(ffn_s, ffn_priced)
    return {"cpu_threads": executor.threads, "cpu_worker_threads": executor.worker_threads,
            "cpu_model": executor.cpu_model, "cpu_upload": executor.upload,
            "cpu_expert_measured_s_median": float(np.median(m)) if m.size else float("nan"),
            "cpu_expert_predicted_s_median": float(np.median(predicted)) if predicted else float("nan"),
            "cpu_expert_ffn_s_median": float(np.median(ffn_s)) if ffn_s else float("nan"),
            "cpu_tokens": int(sum(tokens)),
            "cpu_expert_tokens": tokens, "cpu_expert_measured_s": measured, "cpu_expert_predicted_s": predicted,
            "cpu_expert_ffn_s": ffn_s,
            # the host FFN as it ran against the calibration's price for it (1: as probed)
            "cpu_rate_factor": rate,
            # per timed group: the CPU path from the gather, and the wait for the gather
            "group_cpu_path_s": group_cpu.tolist(), "group_cpu_wait_s": group_wait.tolist()}


def replay(trace, preset, policy="lru", capacity=2, *, gpu=None, device=None, dtype="bfloat16",
           layers=None, seed=0, expert_dtype=None, issue=None, **run_options) -> ReplayResult:
    """One replay: :class:`Replayer` then :meth:`Replayer.run`."""
    return Replayer(trace, preset, gpu=gpu, device=device, dtype=dtype, layers=layers, seed=seed,
                    expert_dtype=expert_dtype, issue=issue).run(policy, capacity, **run_options)


def _decide(rp: Replayer, policy, capacity, scope, batch, threshold, evict, admit, calibration, decisions_file,
            simulate_options=None):
    """The decisions and the prediction, from the simulator, priced for the issue path: the
    fast path's groups by the calibration's grouped FFN table (where it has one), the eager
    path's expert by expert. A decision log must hold exactly these decisions."""
    options = dict(simulate_options or {})
    work = Workload(rp.trace, batch, options.pop("prefill", "skip"))
    cal = calibration
    if cal is not None and rp.issue == "eager" and cal.group_ffn:
        cal = dataclasses.replace(cal, group_ffn={})
    sim = simcache.simulate(work, policy, capacity, scope=scope, threshold=threshold, evict=evict, admit=admit,
                            expert_bytes=rp.expert_bytes, calibration=cal, record=True, **options)
    if decisions_file is not None:
        from simcache.decisions import read_decisions

        log = read_decisions(decisions_file)
        log.check_trace(rp.trace)
        rpf.check_logged(log.meta.get("prefetch"), sim.decisions)
        log.check_decisions(sim.decisions)
    if options.get("miss", "load") != "load":  # hybrid groups are priced expert by expert (hybrid.split)
        return sim, work, "per-expert, hybrid"
    return sim, work, "grouped" if cal is not None and cal.group_ffn else "per-expert"


def _group_ids(groups, L) -> np.ndarray:
    """The simulator's group index (step x L + layer) of each of :func:`_groups`' groups."""
    return np.array([s * L + l for s, l, _, _ in groups], np.int64)


def _groups(work, layers, n_steps, L) -> list[tuple[int, int, int, int]]:
    """(step, layer, first access, one past the last) of every replayed group, in issue order."""
    gp = work.demand.group_ptr
    return [(s, l, int(gp[s * L + l]), int(gp[s * L + l + 1])) for s in range(n_steps) for l in layers]


def _preload(rp: Replayer, work, dec, weights: torch.Tensor, capacity: int, scope: str) -> None:
    """Untimed: copy the experts a rule places before the first step (static placement) into
    their slots. A slot whose first use in the decisions is a hit held its key from the start."""
    E = rp.trace.num_experts
    keys = work.demand.keys
    used = np.flatnonzero(dec.outcome <= FILL)  # hits and fills: they name a slot
    pool = keys[used] // E if scope == "layer" else np.zeros(used.size, np.int64)
    buf = pool * capacity + dec.slot[used]
    _, first = np.unique(buf, return_index=True)
    warm = used[first[dec.outcome[used[first]] == HIT]]
    for i in warm:
        key = int(keys[i])
        if key in rp.key_row:  # (a layer not replayed: its slots are never read)
            b = (key // E if scope == "layer" else 0) * capacity + int(dec.slot[i])
            weights[b].copy_(rp.store.host[rp.key_row[key]])


def _check_gpu_memory(rp: Replayer, n_slots: int, ring: int, prefetch: int = 0) -> None:
    eb = rp.expert_bytes
    need = (n_slots + ring + prefetch) * eb + (64 << 20)
    free = gpu_free_bytes(rp.dev)
    if need > free:
        extra = f" + {prefetch} prefetch buffers" if prefetch else ""
        raise SimcacheError(f"{n_slots} slots + {ring} bypass buffers{extra} of {eb / 2**20:.0f} MiB need "
                            f"{need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB is free")


def _activations(work, hidden, dtype, dev) -> torch.Tensor:
    """One deterministic random row per token slot of the largest step: (n, H)."""
    biggest = int(np.diff(work.steps.step_ptr).max())
    gen = torch.Generator(device=dev).manual_seed(12345)
    return torch.randn((biggest, hidden), generator=gen, device=dev).to(dtype)  # (n, H)


def _issue(issuer, dev, keep: bool = False) -> tuple[list[torch.Tensor], Timings]:
    """Issue every group of the issuer's schedule with the garbage collector off; the outputs
    (kept only if asked) and what the meter read."""
    sched: Schedule = issuer.sched
    meter = Meter(dev, sched.num_groups, int(sched.is_load().sum()))
    outputs = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        meter.begin()
        for g in range(sched.num_groups):
            out = issuer.group(g, meter)
            if keep:
                outputs.append(out)
        meter.end()
    finally:
        if gc_was:
            gc.enable()
    return outputs, meter.read()


def _result(rp, sim, work, sched: Schedule, timed, t: Timings, capacity, scope, n_steps, warmup_steps,
            verified, max_diff, model) -> ReplayResult:
    dev, eb, L = rp.dev, rp.expert_bytes, rp.trace.num_layers
    dec, d = sim.decisions, work.demand
    timed_groups = _group_ids(timed, L)
    group_pred = dec.group_time[timed_groups]
    acc = sched.access
    outcomes = dec.outcome[acc]
    loads = int(np.isin(outcomes, (FILL, BYPASS, FORCED_BYPASS)).sum())
    gbps = eb / t.copy_s / 1e9 if t.copy_s.size else np.zeros(0)
    decode = int(work.steps.step_ptr[n_steps] - work.steps.step_ptr[warmup_steps])
    cuda = dev.type == "cuda"
    return ReplayResult(
        device=(torch.cuda.get_device_name(dev) if cuda else "cpu"),
        preset=rp.preset.name, dtype=rp.dtype_name, policy=sim.policy, capacity=capacity, scope=scope,
        batch=work.batch, layers=rp.layers, steps=n_steps - warmup_steps, decode_tokens=decode,
        groups=len(timed), hits=int((outcomes == HIT).sum()), loads=loads,
        bypasses=int(((outcomes == BYPASS) | (outcomes == FORCED_BYPASS)).sum()),
        cpu_experts=int((outcomes == CPU).sum()),
        expert_bytes=eb, measured_s=t.total_s, predicted_s=float(group_pred.sum()),
        copy_s=float(t.copy_s.sum()), stall_s=float(t.stall_s.sum()),
        copy_gbps_median=float(np.median(gbps)) if gbps.size else float("nan"),
        copy_gbps_all=float(loads * eb / t.copy_s.sum() / 1e9) if t.copy_s.size else float("nan"),
        host_issue_us_per_group=float(t.host_s.mean() * 1e6) if t.host_s.size else 0.0,
        issue=rp.issue, expert_dtype=rp.expert_dtype, idle_s=float(t.idle_s.sum()),
        verified=verified, max_abs_diff=max_diff,
        extra={"threshold": sim.threshold, "calibration": sim.calibration,
               "timing_model": model,
               "simulated_hit_ratio_whole_trace": sim.hit_ratio, "setup_s": rp.setup_s,
               "ring_buffers": sched.ring,
               "host_issue_us_median": float(np.median(t.host_s) * 1e6) if t.host_s.size else 0.0,
               # the first groups after the synchronise, before the launch queue can fill: the
               # host's own issue cost (later groups can include time blocked behind the queue)
               "host_issue_us_first_groups": float(np.median(t.host_s[:4]) * 1e6) if t.host_s.size else 0.0,
               # per timed (step, layer): for checking the timing model group by group
               "group_measured_s": t.gpu_s.tolist(), "group_host_s": t.host_s.tolist(),
               "group_idle_s": t.idle_s.tolist(), "group_stall_s": t.stall_s.tolist(),
               "group_predicted_s": group_pred.tolist(),
               "group_loads": [int(np.isin(dec.outcome[lo:hi], (FILL, BYPASS, FORCED_BYPASS)).sum())
                               for _, _, lo, hi in timed],
               "group_cpu_experts": [int((dec.outcome[lo:hi] == CPU).sum()) for _, _, lo, hi in timed],
               "group_experts": [hi - lo for _, _, lo, hi in timed],
               "group_tokens": [int(d.tokens[lo:hi].sum()) for _, _, lo, hi in timed]},
    )


def _prefetch_extra(rp, sim, work, timed, t: Timings, measured, calibration, model) -> dict[str, Any]:
    """The prefetch and stall columns of a result: prefetches issued in the timed groups (and
    the simulator's count for them), their bytes and measured copy seconds, accesses served
    from a prefetch buffer, and the predicted stall and group starts beside the measured ones
    (starts relative to the first timed group's)."""
    L = rp.trace.num_layers
    ids = np.array([s * L + l for s, l, _, _ in timed], np.int64)
    start, stall = rpf.predicted_timeline(sim.decisions, work, calibration, rp.expert_bytes, ids, model)
    measured_start = np.cumsum(t.idle_s + t.gpu_s) - t.gpu_s  # (G,) compute stream, from the run's start
    out = {"prefetch": sim.prefetch, "prefetch_width": sim.prefetch_width,
           "predicted_stall_s": None if stall is None else float(stall.sum()),
           "group_predicted_start_s": None if start is None else start.tolist(),
           "group_predicted_stall_s": None if stall is None else stall.tolist(),
           "group_measured_start_s": (measured_start - measured_start[:1]).tolist() if ids.size else [],
           "prefetched": sum(int((sim.decisions.outcome[lo:hi] == PREFETCHED).sum()) for _, _, lo, hi in timed)}
    if measured is None:
        return dict(out, prefetches=0, prefetches_scheduled=0, prefetch_bytes=0, prefetch_copy_s=0.0,
                    group_prefetches=[0] * len(timed))
    rows = sim.decisions.prefetch_schedule
    scheduled = int(np.isin(rows[:, 0], ids).sum()) if rows is not None else 0
    n = len(measured["ids"])
    return dict(out, prefetches=n, prefetches_scheduled=scheduled, prefetch_bytes=n * rp.expert_bytes,
                prefetch_copy_s=float(measured["copy_s"].sum()), group_prefetches=measured["per_group"].tolist())
