"""Replay a policy's decisions on a real GPU with real-shaped expert tensors (DESIGN §6).

The simulator decides (hit / fill into slot s evicting v / bypass, for every access); this
harness carries the decisions out and measures them:

* every (layer, expert) of the replayed layers is one row of one pinned host buffer, so a
  load is one copy (:class:`replay.experts.ExpertStore`);
* a GPU slot pool the size of the simulated cache, plus a ring of bypass buffers;
* loads go on a copy stream, each followed by an event; the compute stream computes each
  demanded expert's SwiGLU FFN on the tokens routed to it, hits first, then loaded experts in
  load order, waiting on each one's event — so copies overlap compute inside a (step, layer),
  as the timing model assumes; a (step, layer)'s loads start once the previous one's compute
  is done, since they may overwrite slots and buffers it reads.

It reports measured time per token, bytes moved, achieved GB/s per copy, the time compute
waited for copies, and the host time spent issuing each (step, layer), beside the
simulator's prediction for exactly the replayed steps and layers.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import simcache
from simcache.replay.experts import (DTYPES, ExpertStore, apply_expert, gpu_free_bytes, host_available_bytes,
                            pick_device)
from simcache.replay.presets import Preset
from simcache.errors import SimcacheError
from simcache.simulator import BYPASS, FILL, FORCED_BYPASS, HIT
from simcache.workload import Workload


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
    verified: bool | None = None
    max_abs_diff: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
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
                 seed: int = 0):
        self.dev = pick_device(gpu, device)
        if dtype not in DTYPES:
            raise SimcacheError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        L, E = trace.num_layers, trace.num_experts
        if preset.name != "custom" and preset.num_experts != E:
            raise SimcacheError(f"preset {preset.name} has {preset.num_experts} experts per layer but the "
                                f"trace has {E}; choose a matching preset or --preset custom")
        if preset.name != "custom" and L > preset.num_layers:
            raise SimcacheError(f"the trace has {L} MoE layers, more than {preset.name}'s {preset.num_layers}")
        self.trace, self.preset = trace, preset
        self.layers = parse_layers(layers, L)
        self.expert_bytes = preset.expert_elements() * torch.tensor([], dtype=self.dtype).element_size()
        host_need = len(self.layers) * E * self.expert_bytes
        available = host_available_bytes()
        if host_need > 0.9 * available:
            fit = int(0.9 * available // (E * self.expert_bytes))
            raise SimcacheError(
                f"the experts of {len(self.layers)} layers need {host_need / 2**30:.1f} GiB of pinned host "
                f"memory, {available / 2**30:.1f} GiB is available: replay a subset with --layers "
                f"(about {fit} layers fit)")
        t0 = time.perf_counter()
        self.store = ExpertStore(preset, len(self.layers) * E, self.dtype, self.dev, seed)
        self.setup_s = time.perf_counter() - t0
        self.key_row = {l * E + e: i * E + e for i, l in enumerate(self.layers) for e in range(E)}

    def run(self, policy: str = "lru", capacity: int = 2, *, scope: str = "layer", batch: int = 1,
            threshold: float | str = 0.1, evict: str | None = None, admit: str | None = None,
            steps: int | None = None, bypass_buffers: int = 4,
            calibration: simcache.Calibration | None = None, decisions_file=None, verify: bool = False,
            warmup_steps: int = 2, **simulate_options) -> ReplayResult:
        """Simulate ``policy`` with the preset's expert size, then carry its decisions out and
        measure them. See the module docstring. ``simulate_options`` (``prefill``, ``prior``,
        ``seed``, ``horizon``, ``decay``, ``decay_every``) go to :func:`simcache.simulate`."""
        return _run(self, policy, capacity, scope, batch, threshold, evict, admit, steps, bypass_buffers,
                    calibration, decisions_file, verify, warmup_steps, simulate_options)


def replay(trace, preset, policy="lru", capacity=2, *, gpu=None, device=None, dtype="bfloat16",
           layers=None, seed=0, **run_options) -> ReplayResult:
    """One replay: :class:`Replayer` then :meth:`Replayer.run`."""
    return Replayer(trace, preset, gpu=gpu, device=device, dtype=dtype, layers=layers, seed=seed).run(
        policy, capacity, **run_options)


def _run(rp: Replayer, policy, capacity, scope, batch, threshold, evict, admit, steps, bypass_buffers,
         calibration, decisions_file, verify, warmup_steps, simulate_options) -> ReplayResult:
    trace, preset, dev = rp.trace, rp.preset, rp.dev
    torch_dtype, dtype, replayed, eb = rp.dtype, rp.dtype_name, rp.layers, rp.expert_bytes
    L, E = trace.num_layers, trace.num_experts
    if bypass_buffers < 1:
        raise SimcacheError("--bypass-buffers must be at least 1")

    # 1. the decisions and the prediction, from the simulator
    options = dict(simulate_options)
    work = Workload(trace, batch, options.pop("prefill", "skip"))
    sim = simcache.simulate(work, policy, capacity, scope=scope, threshold=threshold, evict=evict,
                            admit=admit, expert_bytes=eb, calibration=calibration, record=True, **options)
    if decisions_file is not None:
        from simcache.decisions import read_decisions

        log = read_decisions(decisions_file)
        log.check_trace(trace)
        log.check_decisions(sim.decisions)
    d = work.demand
    n_steps = work.steps.num_steps if steps is None else min(int(steps), work.steps.num_steps)
    if n_steps <= warmup_steps:
        raise SimcacheError(f"replay needs more than {warmup_steps} steps (warm-up), got {n_steps}")

    # 2. GPU memory, checked before anything is allocated
    pools = L if scope == "layer" else 1
    n_slots = capacity * pools if scope == "layer" else capacity
    gpu_need = (n_slots + bypass_buffers) * eb + (64 << 20)
    if gpu_need > gpu_free_bytes(dev):
        raise SimcacheError(
            f"{n_slots} slots + {bypass_buffers} bypass buffers of {eb / 2**20:.0f} MiB need "
            f"{gpu_need / 2**30:.1f} GiB of GPU memory, {gpu_free_bytes(dev) / 2**30:.1f} GiB is free")

    # 3. what to run: groups of the replayed steps and layers, with their tokens and weights
    key_row, store = rp.key_row, rp.store
    slots = torch.empty((n_slots, store.W), dtype=torch_dtype, device=dev)  # (S, W)
    ring = torch.empty((bypass_buffers, store.W), dtype=torch_dtype, device=dev)
    plan = _Plan(trace, work, replayed, n_steps, dev).bind(preset.hidden, torch_dtype)
    cuda = dev.type == "cuda"
    copy_stream = torch.cuda.Stream(dev) if cuda else None
    dec = sim.decisions

    # the issue sequence of every group, built before any timing: computes of hits first, then
    # each load, and the computes of loaded experts in load order; a bypass buffer reused inside
    # a group gets the compute that reads it issued before the copy that overwrites it
    def build(groups):
        seq_all, n_loads, ring_next = [], 0, 0
        for s, l, lo, hi in groups:
            pool_base = (l * capacity) if scope == "layer" else 0
            seq = []
            for i in range(lo, hi):
                if dec.outcome[i] == HIT:
                    idx, w = plan.routing(i)
                    seq.append(("C", idx, w, slots[pool_base + int(dec.slot[i])], -1, -1, key_row[int(d.keys[i])]))
            pending = []
            for i in range(lo, hi):
                if dec.outcome[i] == HIT:
                    continue
                row = key_row[int(d.keys[i])]
                if dec.outcome[i] == FILL:
                    buf, r = slots[pool_base + int(dec.slot[i])], -1
                else:
                    r = ring_next
                    ring_next = (ring_next + 1) % bypass_buffers
                    buf = ring[r]
                    while any(p[5] == r for p in pending):
                        seq.append(pending.pop(0))
                seq.append(("L", n_loads, buf, store.host[row], r))
                idx, w = plan.routing(i)
                pending.append(("C", idx, w, buf, n_loads, r, row))
                n_loads += 1
            seq.extend(pending)
            seq_all.append((s, seq))
        return seq_all, n_loads

    def run(schedule, n_loads, measure):
        """Issue every group; returns host seconds per group and the events to read."""
        def events(n, timing=measure):
            return [torch.cuda.Event(enable_timing=timing) for _ in range(n)] if cuda else [None] * n

        n_groups = len(schedule)
        l_start, l_done, st_before, st_after = events(n_loads), events(n_loads), events(n_loads), events(n_loads)
        g_start, g_done = events(n_groups), events(n_groups)
        frees = events(sum(1 for _, seq in schedule for op in seq if op[0] == "C" and op[5] >= 0), False)
        outputs, group_host = [], []
        prev_done, ring_free, used_free = None, [None] * bypass_buffers, 0
        current = torch.cuda.current_stream(dev) if cuda else None
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for g, (s, seq) in enumerate(schedule):
                t0 = time.perf_counter()
                if cuda:
                    g_start[g].record()
                x = plan.x(s)  # (n, H)
                out = torch.zeros_like(x)  # (n, H)
                waited = False
                for op in seq:
                    if op[0] == "L":
                        _, lid, buf, src, r = op
                        if cuda:
                            if not waited and prev_done is not None:
                                copy_stream.wait_event(prev_done)  # earlier computes may read what we overwrite
                            if r >= 0 and ring_free[r] is not None:
                                copy_stream.wait_event(ring_free[r])
                            with torch.cuda.stream(copy_stream):
                                l_start[lid].record()
                                buf.copy_(src, non_blocking=True)
                                l_done[lid].record()
                        else:
                            buf.copy_(src)
                        waited = True
                    else:
                        _, idx, w, buf, lid, r, _row = op
                        if cuda and lid >= 0:
                            st_before[lid].record()
                            current.wait_event(l_done[lid])
                            st_after[lid].record()
                        apply_expert(out, x, idx, w, buf, preset.hidden, preset.ffn)
                        if cuda and r >= 0:
                            frees[used_free].record()
                            ring_free[r] = frees[used_free]
                            used_free += 1
                if cuda:
                    g_done[g].record()
                    prev_done = g_done[g]
                if verify:
                    outputs.append(out)
                group_host.append(time.perf_counter() - t0)
        finally:
            if gc_was:
                gc.enable()
        return group_host, (l_start, l_done, st_before, st_after, g_start, g_done), outputs

    groups = plan.groups
    warm = [g for g in groups if g[0] < warmup_steps]
    timed = [g for g in groups if g[0] >= warmup_steps]
    warm_schedule, warm_loads = build(warm)
    schedule, n_loads = build(timed)
    run(warm_schedule, warm_loads, measure=False)  # untimed: kernels, copies, allocator
    if cuda:
        torch.cuda.synchronize(dev)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    wall0 = time.perf_counter()
    group_host, ev, outputs = run(schedule, n_loads, measure=True)
    if cuda:
        end.record()
        torch.cuda.synchronize(dev)
        measured = begin.elapsed_time(end) / 1e3
        l_start, l_done, st_before, st_after, g_start, g_done = ev
        copy_times = np.array([a.elapsed_time(b) / 1e3 for a, b in zip(l_start, l_done)])
        stall = float(sum(a.elapsed_time(b) for a, b in zip(st_before, st_after)) / 1e3)
        group_gpu = [a.elapsed_time(b) / 1e3 for a, b in zip(g_start, g_done)]
    else:
        measured = time.perf_counter() - wall0
        copy_times = np.zeros(0)
        stall = 0.0
        group_gpu = []
    host = float(sum(group_host))

    verified = max_diff = None
    if verify:
        resident = store.host.to(dev)
        # the reference: the same computes in the same order, every expert resident, no copies
        ref_schedule = [(s_, [("C", op[1], op[2], resident[op[6]], -1, -1, op[6]) for op in seq if op[0] == "C"])
                        for s_, seq in schedule]
        _, _, reference = run(ref_schedule, 0, measure=False)
        diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(outputs, reference)]
        max_diff = max(diffs) if diffs else 0.0
        verified = all(torch.equal(a, b) for a, b in zip(outputs, reference))
        del resident

    timed_groups = np.array([s * L + l for s, l, _, _ in timed], np.int64)
    predicted = float(dec.group_time[timed_groups].sum())
    acc = np.concatenate([np.arange(lo, hi) for _, _, lo, hi in timed]) if timed else np.zeros(0, int)
    outcomes = dec.outcome[acc]
    decode = int(plan.decode_tokens(warmup_steps, n_steps))
    loads = int((outcomes != HIT).sum())
    gbps = eb / copy_times / 1e9 if copy_times.size else np.zeros(0)
    return ReplayResult(
        device=(torch.cuda.get_device_name(dev) if cuda else "cpu"),
        preset=preset.name, dtype=dtype, policy=sim.policy, capacity=capacity, scope=scope, batch=work.batch,
        layers=replayed, steps=n_steps - warmup_steps, decode_tokens=decode, groups=len(timed),
        hits=int((outcomes == HIT).sum()), loads=loads,
        bypasses=int(((outcomes == BYPASS) | (outcomes == FORCED_BYPASS)).sum()),
        expert_bytes=eb, measured_s=measured, predicted_s=predicted,
        copy_s=float(copy_times.sum()), stall_s=stall,
        copy_gbps_median=float(np.median(gbps)) if gbps.size else float("nan"),
        copy_gbps_all=float(loads * eb / copy_times.sum() / 1e9) if copy_times.size else float("nan"),
        host_issue_us_per_group=host / max(len(timed), 1) * 1e6,
        verified=verified, max_abs_diff=max_diff,
        extra={"threshold": sim.threshold, "calibration": sim.calibration,
               "simulated_hit_ratio_whole_trace": sim.hit_ratio, "setup_s": rp.setup_s,
               # per timed (step, layer): for checking the timing model group by group
               "group_measured_s": group_gpu, "group_host_s": group_host,
               "group_predicted_s": dec.group_time[timed_groups].tolist(),
               "group_loads": [int((dec.outcome[lo:hi] != HIT).sum()) for _, _, lo, hi in timed],
               "group_experts": [hi - lo for _, _, lo, hi in timed],
               "group_tokens": [int(d.tokens[lo:hi].sum()) for _, _, lo, hi in timed]},
    )


class _Plan:
    """The replayed (step, layer) groups and, per access, the routed tokens and weights,
    uploaded once so the issue loop does no host-to-device transfers of its own."""

    def __init__(self, trace, work, replayed, n_steps, dev):
        d, steps = work.demand, work.steps
        L, E, k = trace.num_layers, trace.num_experts, trace.top_k
        experts = trace.token_experts()
        weights = (trace.weights.reshape(trace.num_tokens, L, k) if trace.weights is not None
                   else np.full((trace.num_tokens, L, k), 1.0 / k, np.float32))
        self.groups = []
        idx_all, w_all, ptr = [], [], np.zeros(d.keys.shape[0] + 1, np.int64)
        self._ptr = ptr
        lengths = np.zeros(d.keys.shape[0], np.int64)
        for s in range(n_steps):
            toks = steps.step_tokens[steps.step_ptr[s]: steps.step_ptr[s + 1]]
            for l in replayed:
                g = s * L + l
                lo, hi = int(d.group_ptr[g]), int(d.group_ptr[g + 1])
                self.groups.append((s, l, lo, hi))
                ex = experts[toks, l, :]  # (n, k)
                for i in range(lo, hi):
                    rows, cols = np.nonzero(ex == d.keys[i] - l * E)
                    idx_all.append(rows)
                    w_all.append(weights[toks[rows], l, cols])
                    lengths[i] = rows.size
        np.cumsum(lengths, out=ptr[1:])
        self._idx = torch.from_numpy(np.concatenate(idx_all) if idx_all else np.zeros(0, np.int64)).to(dev)
        self._w = torch.from_numpy(np.concatenate(w_all).astype(np.float32) if w_all else np.zeros(0, np.float32)).to(dev)
        self._dev = dev
        self._steps = steps
        self._seed = 12345

    def bind(self, hidden, dtype):
        """Activations (one random row per token slot of a step) and weights in ``dtype``."""
        self._w = self._w.to(dtype).unsqueeze(1)  # (routed, 1)
        sizes = np.diff(self._steps.step_ptr)
        gen = torch.Generator(device=self._dev).manual_seed(self._seed)
        biggest = int(sizes.max())
        self._xbuf = torch.randn((biggest, hidden), generator=gen, device=self._dev).to(dtype)  # (n, H)
        return self

    def x(self, s):
        n = int(self._steps.step_ptr[s + 1] - self._steps.step_ptr[s])
        return self._xbuf[:n]

    def routing(self, i):
        """Token rows (T,) and gate weights (T, 1) of access i."""
        lo, hi = int(self._ptr[i]), int(self._ptr[i + 1])
        return self._idx[lo:hi], self._w[lo:hi]

    def decode_tokens(self, first, last):
        return self._steps.step_ptr[last] - self._steps.step_ptr[first]
