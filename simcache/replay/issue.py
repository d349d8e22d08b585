"""Carry a schedule out on the device: the eager path and the fast path.

Tensor dimensions used in shape comments (see also :mod:`simcache.replay.experts`):
    n  token rows of a step    k  top-k              B  GPU buffers (slots, then bypass ring)
    R  routes of a group (token, expert) pairs       G  experts of one grouped call

Both paths share the copies and the host CPU side (``--miss cpu|auto``): a group's CPU
computes go to a :class:`~simcache.replay.cpu.HostExecutor` first, run on the host while the
GPU computes and copies, and their results are added into the group's output last.

Both paths share the copies: each load is one copy of one contiguous pinned host row into one
GPU buffer, on a copy stream, between two events; a group's copies start once the previous
group's compute is done (they may overwrite what it reads).

* **eager** (``--issue eager``): one expert at a time, about seven PyTorch calls each (gather
  its tokens, three GEMMs with SwiGLU, weight, scatter-add); a loaded expert waits on its own
  copy's event, so hits and earlier loads compute while later copies run.
* **fast** (``--issue fast``, the default on CUDA): a constant number of calls per group,
  whatever its expert count: one gather of the group's token rows, then two grouped SwiGLU
  FFNs (``torch._grouped_mm`` over the weights tensor, the experts picked by offsets, no
  weight gather) — the hits at once, the loads after the group's last copy — and one
  scatter of the weighted outputs into (n, k) positions summed in float32. Quantised experts
  are gathered and dequantised to the compute dtype first (part of the timed FFN).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from simcache.errors import SimcacheError
from simcache.replay.cpu import Job
from simcache.replay.experts import apply_expert
from simcache.replay.measure import Meter
from simcache.replay.schedule import Schedule, grouped_calls


def check_fast(device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> None:
    """The fast path needs ``torch._grouped_mm``; on CUDA that is bfloat16 on compute
    capability 9.0 or newer (Hopper). One-line errors otherwise."""
    if not hasattr(torch, "_grouped_mm"):
        raise SimcacheError(f"--issue fast needs torch._grouped_mm (torch {torch.__version__} has none); "
                            f"use --issue eager")
    if device.type != "cuda":
        return
    if dtype != torch.bfloat16:
        raise SimcacheError(f"--issue fast on CUDA computes in bfloat16 (grouped GEMM), got --dtype "
                            f"{str(dtype).replace('torch.', '')}; use --dtype bfloat16 or --issue eager")
    cap = capability if capability is not None else torch.cuda.get_device_capability(device)
    if tuple(cap) < (9, 0):
        raise SimcacheError(f"--issue fast needs a GPU of compute capability 9.0 or newer for bfloat16 grouped "
                            f"GEMMs (this one is {cap[0]}.{cap[1]}); use --issue eager")


def split_weights(w: torch.Tensor, hidden: int, ffn_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of expert rows w (G, W) = [w1; w3; w2] as grouped-GEMM operands (no copy):
    (G, H, 2F) for x @ [w1; w3]^T and (G, F, H) for h @ w2^T."""
    fh = ffn_size * hidden
    w13 = w[:, : 2 * fh].unflatten(1, (2 * ffn_size, hidden)).transpose(1, 2)  # (G, H, 2F)
    w2 = w[:, 2 * fh:].unflatten(1, (hidden, ffn_size)).transpose(1, 2)  # (G, F, H)
    return w13, w2


def grouped_ffn(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor,
                ffn_size: int) -> torch.Tensor:
    """SwiGLU of G experts on their rows: xs (R, H), rows of expert i ending at offs[i]
    (offs (G,) int32, non-decreasing, offs[-1] = R) -> (R, H)."""
    h = torch._grouped_mm(xs, w13, offs=offs)  # (R, 2F)
    a = F.silu(h[:, :ffn_size]) * h[:, ffn_size:]  # (R, F)
    return torch._grouped_mm(a, w2, offs=offs)  # (R, H)


def expert_part(acc: torch.Tensor, xs: torch.Tensor, dest: torch.Tensor, gate: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, ffn_size: int) -> None:
    """One grouped call: acc[dest] = gate * SwiGLU(xs) with each expert on its rows.
    acc (n k, H) float32, xs (R, H), dest (R,), gate (R, 1) float32; see :func:`grouped_ffn`."""
    y = grouped_ffn(xs, w13, w2, offs, ffn_size)  # (R, H)
    acc.index_copy_(0, dest, y * gate)  # float32: the bf16 y promotes exactly


class _Copies:
    """The copy side, shared by both paths: one copy per load, events around it."""

    def __init__(self, sched: Schedule, weights: torch.Tensor, host: torch.Tensor | None, device: torch.device):
        self.sched, self.weights, self.host = sched, weights, host
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.current = torch.cuda.current_stream(device) if self.cuda else None
        is_load = sched.is_load()
        self.load_id = (np.cumsum(is_load) - 1).tolist()  # (C,) ordinal of each load
        # (destination buffer, source row) of every load, as views made once
        self.pair = [(weights[int(sched.buffer[c])], host[int(sched.store_row[c])]) if is_load[c] else None
                     for c in range(is_load.size)]
        self.prev_done = None  # the previous group's last event on the compute stream
        self.ring_free: list = [None] * max(sched.ring, 1)

    def copy(self, c: int, meter: Meter, first: bool) -> None:
        s, j = self.sched, self.load_id[c]
        dst, src = self.pair[c]
        if not self.cuda:
            dst.copy_(src)
            return
        if first and self.prev_done is not None:
            self.stream.wait_event(self.prev_done)  # earlier computes may read what this overwrites
        r = s.ring_of(c)
        if r >= 0 and self.ring_free[r] is not None:
            self.stream.wait_event(self.ring_free[r])
        with torch.cuda.stream(self.stream):
            meter.copy_start(j)
            dst.copy_(src, non_blocking=True)
            meter.copy_done(j)

    def copy_group(self, loads: range, meter: Meter) -> None:
        """All of a group's loads, in order, under one switch to the copy stream (the fast
        path, whose bypass buffers are never reused inside a group)."""
        if not self.cuda:
            for c in loads:
                self.copy(c, meter, first=False)
            return
        with torch.cuda.stream(self.stream):
            if self.prev_done is not None:
                self.stream.wait_event(self.prev_done)  # earlier computes may read what this overwrites
            for c in loads:
                j = self.load_id[c]
                dst, src = self.pair[c]
                meter.copy_start(j)
                dst.copy_(src, non_blocking=True)
                meter.copy_done(j)

    def wait(self, g: int, c: int, meter: Meter) -> None:
        """The compute stream waits for load c's copy."""
        if self.cuda:
            j = self.load_id[c]
            meter.wait_before(g, j)
            self.current.wait_event(meter.l_done[j])
            meter.wait_after(j)


class _CpuSide:
    """The host CPU side, shared by both paths: per group, the :class:`Job` of each CPU compute
    (its host weights row, token rows and gate weights, made once)."""

    def __init__(self, sched: Schedule, host, executor, x: torch.Tensor, device):
        self.executor = executor
        self.jobs: list[list[Job]] = []
        if executor is None or not int(sched.cpu.sum()):
            self.jobs = [[] for _ in range(sched.num_groups)]
            return
        if host is None:
            raise SimcacheError("the schedule has CPU computes but no host expert store")
        tok = torch.from_numpy(sched.route_token).to(device)  # (R,)
        gate = torch.from_numpy(sched.route_weight).to(device).to(x.dtype).unsqueeze(1)  # (R, 1)
        for g in range(sched.num_groups):
            self.jobs.append([Job(host[int(sched.store_row[c])], tok[sched.routes(c)], gate[sched.routes(c)])
                              for c in sched.cpu_computes(g)])
        self.tickets: list = []  # per group with CPU work: its Ticket (per-expert and path seconds)

    def start(self, g: int, x: torch.Tensor):
        if not self.jobs[g]:
            return None
        ticket = self.executor.submit(x, self.jobs[g])
        self.tickets.append((g, ticket))
        return ticket

    def finish(self, ticket, out: torch.Tensor) -> None:
        if ticket is not None:
            self.executor.finish(ticket, out)


def _check_cpu(sched: Schedule, executor) -> None:
    if executor is None and sched.cpu.size and int(sched.cpu.sum()):
        raise SimcacheError("the schedule sends experts to the host CPU: pass a HostExecutor")


class EagerIssue:
    """One expert at a time (the harness before the fast path; kept for comparison)."""

    def __init__(self, sched: Schedule, weights: torch.Tensor, host, store, x: torch.Tensor, device,
                 executor=None):
        _check_cpu(sched, executor)
        self.sched, self.store, self.x = sched, store, x
        self.copies = _Copies(sched, weights, host, device)
        self.cpu = _CpuSide(sched, host, executor, x, device)
        self.weights = weights
        p = store.preset
        self.hidden, self.ffn = p.hidden, p.ffn
        self.tok = torch.from_numpy(sched.route_token).to(device)  # (R,)
        self.gate = torch.from_numpy(sched.route_weight).to(device).to(x.dtype).unsqueeze(1)  # (R, 1)
        self.frees = [torch.cuda.Event() for _ in range(sched.ring)] if device.type == "cuda" else []
        self.prefetch = None  # a simcache.replay.prefetch.Delivery, attached by the harness

    def group(self, g: int, meter: Meter) -> torch.Tensor:
        s, cp = self.sched, self.copies
        meter.group_start(g)
        x = self.x[: int(s.rows[g])]  # (n, H)
        ticket = self.cpu.start(g, x)
        out = torch.zeros_like(x)  # (n, H)
        loads = s.loads(g)
        for c in range(s.compute_ptr[g], loads.start):
            self._compute(out, x, c)
        pending: list[int] = []
        for c in loads:
            r = s.ring_of(c)
            while r >= 0 and any(s.ring_of(p) == r for p in pending):
                self._compute_loaded(out, x, g, pending.pop(0), meter)  # before its buffer is overwritten
            cp.copy(c, meter, first=c == loads.start)
            pending.append(c)
        if self.prefetch is not None:  # the prefetches started during g queue behind its demand copies
            self.prefetch.issue(g, cp.prev_done)
        for c in pending:
            self._compute_loaded(out, x, g, c, meter)
        self.cpu.finish(ticket, out)
        meter.group_done(g)
        if cp.cuda:
            cp.prev_done = meter.g_done[g]
        return out

    def _compute(self, out, x, c):
        s = self.sched
        r = s.routes(c)
        if self.prefetch is not None:
            self.prefetch.wait(c)  # a prefetch delivered it: the compute stream waits for the copy
        w = self.store.weights(self.weights[int(s.buffer[c])])  # (W,)
        apply_expert(out, x, self.tok[r], self.gate[r], w, self.hidden, self.ffn)

    def _compute_loaded(self, out, x, g, c, meter):
        self.copies.wait(g, c, meter)
        self._compute(out, x, c)
        r = self.sched.ring_of(c)
        if r >= 0 and self.frees:
            self.frees[r].record()
            self.copies.ring_free[r] = self.frees[r]


class _Call(NamedTuple):
    """One grouped call, its operands as views made once: rows lo:hi of the group's gathered
    rows, its routes' output positions and gate weights, its offsets, and its experts (weight
    views of a window of the weights tensor, or the buffers to gather for quantised ones)."""

    lo: int
    hi: int
    dest: torch.Tensor  # (R_p,)
    gate: torch.Tensor  # (R_p, 1) float32
    offs: torch.Tensor  # (G,) int32
    w13: torch.Tensor | None  # (G, H, 2F)
    w2: torch.Tensor | None  # (G, F, H)
    bufs: torch.Tensor | None  # (G,)


class FastIssue:
    """A constant number of host calls per group (see the module docstring)."""

    def __init__(self, sched: Schedule, weights: torch.Tensor, host, store, x: torch.Tensor, device,
                 executor=None):
        _check_cpu(sched, executor)
        self.sched, self.store, self.x, self.weights = sched, store, x, weights
        self.copies = _Copies(sched, weights, host, device)
        self.cpu = _CpuSide(sched, host, executor, x, device)
        p = store.preset
        self.hidden, self.ffn, self.k = p.hidden, p.ffn, sched.top_k
        self.quantised = store.expert_dtype is not None
        if not self.quantised:  # quantised rows are gathered and dequantised per call instead
            w13_all, w2_all = split_weights(weights, p.hidden, p.ffn)  # (B, H, 2F), (B, F, H)
        c = grouped_calls(sched, compact=self.quantised)
        up = (lambda a: torch.from_numpy(a).to(device))
        tok, dest, gate, offs, bufs = up(c.token), up(c.dest), up(c.weight).unsqueeze(1), up(c.offs), up(c.buffers)
        rp, op = c.route_ptr.tolist(), c.offs_ptr.tolist()
        self.rows, self.tok, self.calls = [], [], []  # per group: x rows, token rows; per call: _Call or None
        for g in range(sched.num_groups):
            base = rp[2 * g]
            self.rows.append(x[: int(sched.rows[g])])  # (n, H)
            self.tok.append(tok[base: rp[2 * g + 2]])  # (R,)
            for q in (2 * g, 2 * g + 1):
                if rp[q] == rp[q + 1]:
                    self.calls.append(None)
                    continue
                lo, hi = int(c.win_lo[q]), int(c.win_hi[q])
                self.calls.append(_Call(
                    rp[q] - base, rp[q + 1] - base, dest[rp[q]: rp[q + 1]], gate[rp[q]: rp[q + 1]], offs[op[q]: op[q + 1]],
                    None if self.quantised else w13_all[lo:hi], None if self.quantised else w2_all[lo:hi],
                    bufs[op[q]: op[q + 1]] if self.quantised else None))

    def group(self, g: int, meter: Meter) -> torch.Tensor:
        s, cp = self.sched, self.copies
        meter.group_start(g)
        x = self.rows[g]  # (n, H)
        n = x.shape[0]
        ticket = self.cpu.start(g, x)
        xs = x.index_select(0, self.tok[g])  # (R, H) the group's rows, hits then loads
        acc = torch.zeros((n * self.k, self.hidden), dtype=torch.float32, device=x.device)  # (n k, H)
        loads = s.loads(g)
        if loads:
            cp.copy_group(loads, meter)
        self._call(acc, xs, self.calls[2 * g])  # the hits, while the copies run
        if loads:
            cp.wait(g, loads.stop - 1, meter)  # copies land in order: the last one covers all
        self._call(acc, xs, self.calls[2 * g + 1])  # the loaded experts
        out = acc.view(n, self.k, self.hidden).sum(1).to(x.dtype)  # (n, H)
        self.cpu.finish(ticket, out)
        meter.group_done(g)
        if cp.cuda:
            cp.prev_done = meter.g_done[g]
        return out

    def _call(self, acc, xs, call: _Call | None) -> None:
        if call is None:
            return
        w13, w2 = call.w13, call.w2
        if self.quantised:
            w13, w2 = split_weights(self.store.weights(self.weights.index_select(0, call.bufs)),  # (G, W)
                                    self.hidden, self.ffn)
        expert_part(acc, xs[call.lo: call.hi], call.dest, call.gate, w13, w2, call.offs, self.ffn)


ISSUERS = {"eager": EagerIssue, "fast": FastIssue}  # keys: simcache.replay.ISSUE_PATHS
